"""The statistics of d_int, pure numpy: direction, crossings, censoring, the t-interval.

Shared by the grid sweep and the automatic search. Conventions:

* A value that is not finite (NaN, inf, a diverged run; ``None`` read back from JSON) never
  reaches the target and never enters an interpolation.
* A **margin** is how far one seed is past its target: ``value - fraction x baseline`` for an
  accuracy, ``baseline / fraction - value`` for a loss. The mean curve reaches the target
  exactly where the mean margin is ``>= 0``, whatever the metric's direction.
* A **censored** estimate is a bound, not a value: the target is already reached at the
  smallest evaluated d (``d_int_upper_bound``), never reached (``d_int_lower_bound``), or
  the point next to the crossing is not finite (both bounds, from finite points only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30; beyond, the
# Cornish-Fisher expansion in 1/df to the third order (error < 1e-5 for df > 30).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def target_value(baseline: float, fraction: float, metric: str) -> float:
    """``fraction x baseline`` for an accuracy, ``baseline / fraction`` for a loss."""
    return baseline / fraction if lower_is_better(metric) else fraction * baseline


def finite(value) -> float:
    """``value`` as a float, NaN for ``None`` (a non-finite value stored as JSON null)."""
    return math.nan if value is None else float(value)


def reaches(value: float, target: float, metric: str) -> bool:
    """Accuracy at or above the target, loss at or below it; never for a non-finite value."""
    if not math.isfinite(value):
        return False
    return value <= target if lower_is_better(metric) else value >= target


def margins(values, baseline, fraction: float, metric: str) -> np.ndarray:
    """Per-seed margins past the target.

    Args:
      values: ``(..., n_seeds)`` metric values.
      baseline: ``(n_seeds,)`` each seed's own baseline, or a fixed number.
      fraction: the threshold fraction.
      metric: decides the direction.

    Returns:
      ``(..., n_seeds)``: ``values - fraction x baseline`` (accuracy) or
      ``baseline / fraction - values`` (loss); NaN where the value is not finite.
    """
    v = np.asarray(values, np.float64)
    b = np.asarray(baseline, np.float64)
    out = b / fraction - v if lower_is_better(metric) else v - fraction * b
    return np.where(np.isfinite(out), out, np.nan)


def log_interpolate(d0: float, d1: float, m0: float, m1: float) -> float:
    """The d in ``[d0, d1]`` where the line through ``(log d0, m0)``, ``(log d1, m1)`` is 0."""
    frac = -m0 / (m1 - m0) if m1 != m0 else 1.0
    return float(math.exp(math.log(d0) + frac * (math.log(d1) - math.log(d0))))


def interpolate_crossing(
    dims: Sequence[float], values: Sequence[float], target: float
) -> float | None:
    """Smallest d where the curve ``values(dims)`` reaches ``target``, interpolated in log d.

    ``dims`` must be increasing; higher values are better. A non-finite value never reaches the
    target and is never an end of the interpolation: if the first reaching point is the first
    point, or the point before it is not finite, that point itself is returned (only an upper
    bound: :func:`grid_estimate` flags it). None if no point reaches the target.
    """
    vals = [finite(v) for v in values]
    for i, (d, v) in enumerate(zip(dims, vals, strict=True)):
        if math.isfinite(v) and v >= target:
            if i == 0 or not math.isfinite(vals[i - 1]):
                return float(d)
            return log_interpolate(dims[i - 1], d, vals[i - 1] - target, v - target)
    return None


def crossing(dims: Sequence[float], means: Sequence[float], target: float, metric: str):
    """:func:`interpolate_crossing` in the metric's direction."""
    if lower_is_better(metric):
        return interpolate_crossing(dims, [-finite(m) for m in means], -target)
    return interpolate_crossing(dims, means, target)


def non_monotone_dims(dims: Sequence[int], mean_margins: Sequence[float]) -> list[int]:
    """The finite points that reach the target below a finite point that misses it.

    Empty when the finite points, in increasing d, miss and then reach the target at most once
    (one crossing). Non-finite points are left out (they are listed apart).
    """
    pts = [(int(d), float(m)) for d, m in zip(dims, mean_margins, strict=True) if np.isfinite(m)]
    out = []
    for i, (d, m) in enumerate(pts):
        if m >= 0 and any(m2 < 0 for _, m2 in pts[i + 1 :]):
            out.append(d)
    return out


def estimate(
    hi: int | None, dims: Sequence[int], mean_margins: Sequence[float], lo: int | None
) -> dict:
    """d_int from a bracket, or the bounds the finite points give when it cannot be interpolated.

    Args:
      hi: the smallest d known to reach the target (None: none does).
      dims: every evaluated d (increasing).
      mean_margins: ``(len(dims),)`` mean margin of each d (NaN if not finite).
      lo: the largest d below ``hi`` that misses it (None: none evaluated).

    Returns:
      ``{"d_int", "censored", "d_int_upper_bound", "d_int_lower_bound"}``: ``d_int`` interpolated
      in log d between ``lo`` and ``hi`` when both are finite; otherwise ``d_int`` is None and the
      bounds come from finite points only (``hi`` above; the largest finite miss below ``hi``).
    """
    m = dict(zip((int(d) for d in dims), (float(x) for x in mean_margins), strict=True))
    if hi is not None and lo is not None and np.isfinite(m[lo]):
        d_int = log_interpolate(lo, hi, m[lo], m[hi])
        return {
            "d_int": d_int,
            "censored": False,
            "d_int_upper_bound": None,
            "d_int_lower_bound": None,
        }
    below = [d for d in m if np.isfinite(m[d]) and m[d] < 0 and (hi is None or d < hi)]
    lower = max(below) if below else None
    return {
        "d_int": None,
        "censored": hi is not None or lower is not None,
        "d_int_upper_bound": hi,
        "d_int_lower_bound": lower,
    }


def grid_estimate(dims: Sequence[int], mean_margins: Sequence[float]) -> dict:
    """The sweep's rule: the first crossing on the grid (:func:`estimate` at the first reach)."""
    hi = next((int(d) for d, m in zip(dims, mean_margins, strict=True) if m >= 0), None)
    lo = None if hi is None or int(dims[0]) == hi else int(dims[list(dims).index(hi) - 1])
    return estimate(hi, dims, mean_margins, lo)


def t_quantile(level: float, df: int) -> float:
    """Two-sided Student-t quantile ``t_{(1 + level) / 2, df}`` (``level`` 0.95 only)."""
    if abs(level - 0.95) > 1e-12:
        raise ValueError(f"only the 95% level is tabulated, got {level!r}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def curvature_allowance(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Bound ``M`` on ``|m''|`` per segment, from second differences of the mean margin in log d.

    Args:
      x: ``(n,)`` increasing log d.
      mean: ``(n,)`` mean margin.

    Returns:
      ``(n - 1,)``: for each segment the largest ``|second difference|`` at its ends' interior
      neighbours (0 with fewer than three points). Linear interpolation on a segment of width
      ``h`` then errs by at most ``M h^2 t (1 - t) / 2`` at fraction ``t`` of it.
    """
    n = x.size
    out = np.zeros(max(n - 1, 0))
    if n < 3:
        return out
    slope = np.diff(mean) / np.diff(x)
    second = np.abs(2 * np.diff(slope) / (x[2:] - x[:-2]))  # at the interior points 1..n-2
    out[:-1] = second  # segment i has interior point i + 1 at its right end ...
    out[1:] = np.maximum(out[1:], second)  # ... and interior point i at its left end
    return out


def crossing_interval(
    dims: Sequence[int],
    per_seed_margins: np.ndarray,
    d_int: float,
    *,
    level: float = 0.95,
    points: int = 64,
) -> tuple[float | None, float | None]:
    """The interval of d around ``d_int`` where zero mean margin is not rejected.

    At each d the per-seed margins (linearly interpolated in log d between evaluated points)
    are tested for zero mean by a two-sided one-sample t-test over the seeds (``n - 1``
    degrees of freedom); the tolerance is widened by the largest error linear interpolation can
    make given the curvature of the mean curve (:func:`curvature_allowance`). The interval is
    the connected set of accepted d containing ``d_int``; it contains the crossing of the
    *expected* mean curve with probability ``level`` (Fieller's construction: the slope's
    uncertainty is in the per-seed curves).

    Args:
      dims: ``(n,)`` increasing evaluated d, every seed finite at each.
      per_seed_margins: ``(n, n_seeds)``, ``n_seeds >= 2``.
      d_int: the point estimate, inside ``[dims[0], dims[-1]]``.
      level: confidence level (0.95).
      points: grid points per segment to locate the ends.

    Returns:
      ``(low, high)``; an end is None when the accepted set reaches the evaluated range's end
      (the interval is not bounded by evaluated points there).
    """
    r = np.asarray(per_seed_margins, np.float64)
    x = np.log(np.asarray(dims, np.float64))
    n_seeds = r.shape[1]
    c = t_quantile(level, n_seeds - 1)
    curv = curvature_allowance(x, r.mean(axis=1))

    def excess(i: int, t: np.ndarray) -> np.ndarray:
        """``|mean| - c se - allowance`` at fractions ``t`` of segment i: > 0 where rejected."""
        rs = (1 - t)[:, None] * r[i] + t[:, None] * r[i + 1]
        se = rs.std(axis=1, ddof=1) / math.sqrt(n_seeds)
        allowance = curv[i] * (x[i + 1] - x[i]) ** 2 * t * (1 - t) / 2
        return np.abs(rs.mean(axis=1)) - c * se - allowance

    grid = np.linspace(0.0, 1.0, points)
    xs = np.concatenate([x[i] + grid[i > 0 :] * (x[i + 1] - x[i]) for i in range(x.size - 1)])
    gs = np.concatenate([excess(i, grid[i > 0 :]) for i in range(x.size - 1)])
    x0 = math.log(d_int)
    seg = int(np.clip(np.searchsorted(x, x0, side="right") - 1, 0, x.size - 2))
    g0 = min(0.0, excess(seg, np.array([(x0 - x[seg]) / (x[seg + 1] - x[seg])]))[0])
    k = int(np.searchsorted(xs, x0))

    def end(px: np.ndarray, pg: np.ndarray) -> float | None:
        """Where ``pg`` (0 at ``px[0]`` = d_int, then walking away) first turns positive."""
        hit = np.flatnonzero(pg > 0)
        if not hit.size:
            return None
        j = hit[0]  # >= 1, as pg[0] = g0 <= 0
        frac = -pg[j - 1] / (pg[j] - pg[j - 1])
        return float(math.exp(px[j - 1] + frac * (px[j] - px[j - 1])))

    high = end(np.r_[x0, xs[k:]], np.r_[g0, gs[k:]])
    low = end(np.r_[x0, xs[:k][::-1]], np.r_[g0, gs[:k][::-1]])
    return low, high


def metric_value(record: dict, metric: str, which: str) -> float:
    """The value of ``metric`` in one per-seed record (``which``: final or best epoch).

    NaN when the run diverged (``record["diverged"]``) or the value is not finite (stored as
    JSON null); a best-epoch loss is NaN if any epoch's loss is.
    """
    if record.get("diverged", False):
        return math.nan
    if metric == "val_loss":
        if which == "best":
            curve = [finite(v) for v in record.get("val_loss_curve") or [None]]
            return float(min(curve)) if all(map(math.isfinite, curve)) else math.nan
        return finite(record.get("val_loss"))
    return finite(record.get("val_accuracy" if which == "final" else "best_val_accuracy"))
