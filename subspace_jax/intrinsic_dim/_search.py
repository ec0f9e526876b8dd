"""The automatic intrinsic-dimension search: bracket by doubling, bisect in log d, t-interval.

``search_intrinsic_dim`` finds d_int (by default d_int90) with far fewer trainings than a
grid:

1. The baseline: direct training (``d = 0``) of every seed, or a fixed number. A baseline
   seed that diverged or gave a non-finite metric is an error (lower the learning rate).
2. The target: ``fraction x baseline`` for an accuracy; ``baseline / fraction`` for a loss
   (a loss *reaches* the target when it is at or below it).
3. Bracketing (:func:`bracket_step`): train ``d_start``; while the mean metric over seeds
   misses the target, double d (up to ``d_max``, by default the model's D); if ``d_start``
   already reaches it, halve d instead (down to ``d_min``) until it does not.
4. Bisection (:func:`bisect_step`) in ``log d`` between the largest failing d (``lo``) and the
   smallest succeeding d (``hi``), at the rounded geometric midpoint, until
   ``hi / lo - 1 <= precision`` (or ``hi - lo <= 1``).
5. d_int: the crossing of the mean curve inside the final bracket ``[lo, hi]``, interpolated
   linearly in ``log d``. If ``lo`` or ``hi`` is missing (the target is reached at the first
   d tried or never) or ``lo`` is not finite, d_int is a flagged bound (``censored``).
6. The interval (:func:`~subspace_jax.intrinsic_dim.crossing_interval`): the d around d_int
   where a t-test over seeds does not reject a zero mean margin, widened by the interpolation
   error the curvature allows. While an end reaches past the evaluated range, the search
   doubles above it (or halves below) once more, at most ``ci_extend`` times per side
   (:func:`extend_step`); these points change only the interval, never d_int.
7. The success probability of each d (Larsen et al. 2022): the fraction of seeds whose own
   run reaches the target.

A non-finite metric or a diverged seed never reaches the target, never enters an
interpolation and is listed in ``non_finite_runs``. The steps are pure functions of an
:class:`Evaluations` record (:func:`run_search` drives them with any ``measure(d)``, so the
logic is tested on synthetic curves without training); :func:`search_intrinsic_dim` adds the
training through ``evaluate(dims, seeds) -> records`` (by default
:func:`~subspace_jax.intrinsic_dim.run_dims`, which trains the seeds of one d together under
``vmap``, appends each record to ``out_dir/runs.jsonl`` at once and reuses the records already
there) and the files. The path is deterministic given the records, so a second call, say with a
tighter ``precision``, retraces the first from ``runs.jsonl`` and trains only the new d values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from subspace_jax import _results
from subspace_jax._errors import UserError
from subspace_jax.data import data_fingerprint
from subspace_jax.intrinsic_dim._stats import (
    crossing,
    crossing_interval,
    estimate,
    lower_is_better,
    margins,
    metric_value,
    non_monotone_dims,
    reaches,
    target_value,
)
from subspace_jax.intrinsic_dim._sweep import RUNS_FILE, config_key, load_checked_data, run_dims
from subspace_jax.train import TrainConfig

METRICS = ("val_accuracy", "val_loss")
WHICH = ("final", "best")
#: Points of the grid the search is compared with (``num_training_runs.grid_equivalent``).
GRID_POINTS = 10
CI_LEVEL = 0.95
ID_JSON = "id.json"
ID_PLOT = "id.png"

Evaluate = Callable[[Sequence[int], Sequence[int]], list[dict]]
Progress = Callable[[dict], None]
Measure = Callable[[int], np.ndarray]


# ------------------------------------------------------------------------------ metric rules


def metric_field(metric: str, which: str) -> str:
    """The record field the metric is read from (``val_accuracy`` or ``best_val_accuracy``)."""
    return metric if which == "final" else f"best_{metric}"


def bootstrap_crossings(
    dims: Sequence[int],
    values: np.ndarray,
    baseline: np.ndarray | float,
    *,
    fraction: float,
    metric: str,
    n_bootstrap: int,
    seed: int = 0,
) -> np.ndarray:
    """The first crossing recomputed on ``n_bootstrap`` resamples of the seeds.

    Kept for comparison (``bootstrap_ci``): with 3 seeds there are only 10 distinct resamples
    and the percentile interval under-covers; the reported interval is the t-interval.

    Args:
      dims: ``(n_dims,)`` increasing subspace dimensions.
      values: ``(n_dims, n_seeds)`` metric of each seed at each d.
      baseline: ``(n_seeds,)`` baseline metric of each seed (resampled with the same seed
        indices: seed s of direct training and of the subspace share the model's init), or a
        fixed number.
      fraction: the threshold fraction.
      metric: metric name (decides the direction).
      n_bootstrap: number of resamples.
      seed: seed of the resampling.

    Returns:
      ``(n_bootstrap,)`` crossings; ``inf`` where the resampled mean curve never reaches the
      target on the evaluated dims.
    """
    values = np.asarray(values, np.float64)
    n_seeds = values.shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
    means = values[:, idx].mean(axis=-1)  # (n_dims, n_bootstrap)
    if np.ndim(baseline):
        base = np.asarray(baseline, np.float64)[idx].mean(axis=-1)
    else:
        base = np.full(n_bootstrap, float(baseline))
    out = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        c = crossing(dims, means[:, b], target_value(base[b], fraction, metric), metric)
        out[b] = np.inf if c is None else c
    return out


def percentile_or_none(samples: np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile (linear, as numpy's default); None if it involves ``inf``."""
    s = np.sort(np.asarray(samples, np.float64))
    if s.size == 0:
        return None
    pos = q / 100 * (s.size - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    if not np.isfinite(s[hi]):
        return None
    return float(s[lo] + (pos - lo) * (s[hi] - s[lo]))


def search_definition(
    fraction: float,
    metric: str,
    which: str,
    baseline_text: str,
    seeds: Sequence[int],
    d_start: int,
    precision: float,
    n_bootstrap: int,
) -> str:
    label = f"d_int{round(fraction * 100)}"
    what = f"{'best-epoch' if which == 'best' else 'final'} {metric.replace('_', ' ')}"
    if lower_is_better(metric):
        rule = f"falls to or below the baseline / {fraction}"
    else:
        rule = f"reaches {fraction} x the baseline"
    boot = (
        f"; bootstrap_ci is the 2.5-97.5 percentile range over {n_bootstrap} bootstrap "
        "resamples of the seeds, for comparison only (it under-covers with few seeds)"
        if n_bootstrap
        else ""
    )
    return (
        f"{label}: the smallest subspace dimension d at which the mean {what} over seeds "
        f"{list(seeds)} {rule}, the baseline being {baseline_text}. Found by doubling d from "
        f"{d_start} (halving if {d_start} already reaches the target) until the mean crosses "
        f"the target, then bisecting in log d until hi/lo - 1 <= {precision}; the value is "
        "interpolated linearly in log d inside the final bracket [lo, hi] (lo: the largest "
        "evaluated d below the target, hi: the smallest at or above it). If the target is "
        "reached at the first d tried, never reached, or lo's mean is not finite, d_int is null "
        "and d_int_upper_bound / d_int_lower_bound give the bound (censored). A non-finite or "
        "diverged run never reaches the target and is never interpolated. The 95% interval is "
        "the set of d around d_int where a two-sided one-sample t-test over the seeds (n - 1 "
        "degrees of freedom) does not reject a zero mean margin (each seed's metric minus its "
        "target, interpolated linearly in log d between evaluated d), the tolerance widened by "
        "the largest linear-interpolation error allowed by the mean curve's curvature "
        "(|second difference| x h^2 / 8 on a segment of width h in log d); d is doubled beyond "
        f"the evaluated range, or halved below it, while the interval reaches past it{boot}. "
        "success_probability is the fraction of seeds whose own run reaches the target "
        "(Larsen et al. 2022)."
    )


# ------------------------------------------------------------------------------ the pure search


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """Everything the search decides by, besides the measurements.

    ``baseline`` is ``(n_seeds,)`` (each seed's own direct run) or a fixed number; ``d_max``
    is resolved (the model's D at most).
    """

    fraction: float
    metric: str
    baseline: np.ndarray | float
    d_max: int
    precision: float = 0.2
    d_start: int = 256
    d_min: int = 1
    ci_extend: int = 2
    ci_level: float = CI_LEVEL

    @property
    def target(self) -> float:
        return target_value(float(np.mean(self.baseline)), self.fraction, self.metric)


@dataclasses.dataclass
class Evaluations:
    """The record of a search.

    ``values[d]`` is ``(n_seeds,)``, NaN where a run is not finite or diverged; ``path`` lists
    each step in order as ``{"dim", "mean", "reached", "phase"}`` (phase: bracket, bisect or
    ci); a d is measured once even if the path visits it again.
    """

    values: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    path: list[dict] = dataclasses.field(default_factory=list)


def bracket_step(path: Sequence[dict], spec: SearchSpec) -> int | None:
    """The next d of the bracketing phase (doubling, or halving from a reaching start), or None."""
    if not path:
        return min(spec.d_start, spec.d_max)
    first, last = path[0], path[-1]
    if first["reached"]:
        if last["reached"] and last["dim"] > spec.d_min:
            return max(spec.d_min, last["dim"] // 2)
        return None
    if not last["reached"] and last["dim"] < spec.d_max:
        return min(2 * last["dim"], spec.d_max)
    return None


def bracket(path: Sequence[dict]) -> tuple[int | None, int | None]:
    """``(lo, hi)``: the last failing and last reaching d of the bracket and bisection phases.

    Bracketing moves one way and bisection stays inside the bracket, so these are the largest
    failing d below the smallest reaching one.
    """
    lo = hi = None
    for p in path:
        if p["phase"] in ("bracket", "bisect"):
            lo, hi = (lo, p["dim"]) if p["reached"] else (p["dim"], hi)
    return lo, hi


def bisect_step(lo: int | None, hi: int | None, precision: float) -> int | None:
    """The rounded geometric midpoint of ``[lo, hi]``, or None once it is narrow enough."""
    if lo is None or hi is None or hi / lo - 1 <= precision or hi - lo <= 1:
        return None
    return min(max(int(round(math.sqrt(lo * hi))), lo + 1), hi - 1)


def _table(record: Evaluations, spec: SearchSpec) -> tuple[list[int], np.ndarray]:
    """Evaluated d > 0 (increasing) and their per-seed margins ``(n_dims, n_seeds)``."""
    dims = sorted(d for d in record.values if d > 0)
    values = np.array([record.values[d] for d in dims], np.float64).reshape(len(dims), -1)
    return dims, margins(values, spec.baseline, spec.fraction, spec.metric)


def point_estimate(record: Evaluations, spec: SearchSpec) -> dict:
    """d_int (or its bounds) from the final bracket; see :func:`estimate`."""
    dims, r = _table(record, spec)
    lo, hi = bracket(record.path)
    return estimate(hi, dims, r.mean(axis=1), lo)


def interval(record: Evaluations, spec: SearchSpec, d_int: float | None):
    """``(ci_low, ci_high)`` from the d where every seed is finite; None, None without one."""
    dims, r = _table(record, spec)
    keep = np.all(np.isfinite(r), axis=1)
    if d_int is None or r.shape[1] < 2 or keep.sum() < 2:
        return None, None
    return crossing_interval(
        [d for d, k in zip(dims, keep, strict=True) if k], r[keep], d_int, level=spec.ci_level
    )


def extend_step(record: Evaluations, spec: SearchSpec) -> int | None:
    """The next d for the interval: one doubling above (halving below) the evaluated range while
    the interval's end reaches past it, at most ``ci_extend`` per side; None when done."""
    d_int = point_estimate(record, spec)["d_int"]
    if d_int is None or next(iter(record.values.values())).size < 2:
        return None
    low, high = interval(record, spec, d_int)
    lo, hi = bracket(record.path)
    dims = sorted(d for d in record.values if d > 0)
    extra = [p["dim"] for p in record.path if p["phase"] == "ci"]
    if high is None and sum(d > hi for d in extra) < spec.ci_extend and dims[-1] < spec.d_max:
        return min(2 * dims[-1], spec.d_max)
    if low is None and sum(d < lo for d in extra) < spec.ci_extend and dims[0] > spec.d_min:
        return max(spec.d_min, dims[0] // 2)
    return None


def visit(record: Evaluations, measure: Measure, d: int, phase: str, spec: SearchSpec) -> dict:
    """Measure ``d`` (once) and append the step to ``record.path``."""
    if d not in record.values:
        record.values[d] = np.asarray(measure(d), np.float64)
    mean = float(np.mean(record.values[d]))
    step = {"dim": d, "mean": mean, "reached": reaches(mean, spec.target, spec.metric)}
    record.path.append({**step, "phase": phase})
    return record.path[-1]


def run_search(
    measure: Measure,
    spec: SearchSpec,
    *,
    record: Evaluations | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> Evaluations:
    """Bracket, bisect and extend for the interval, measuring each d with ``measure(d)``.

    Args:
      measure: ``d -> (n_seeds,)`` metric values (NaN where not finite or diverged).
      spec: the search's settings and baseline.
      record: evaluations to start from (values already measured are not measured again).
      on_step: called with each path step.

    Returns:
      The record: every measured d and the path.
    """
    record = Evaluations() if record is None else record
    phases = (
        ("bracket", lambda: bracket_step(record.path, spec)),
        ("bisect", lambda: bisect_step(*bracket(record.path), spec.precision)),
        ("ci", lambda: extend_step(record, spec)),
    )
    for phase, step in phases:
        while (d := step()) is not None:
            done = visit(record, measure, d, phase, spec)
            if on_step is not None:
                on_step(done)
    return record


def summarise(record: Evaluations, spec: SearchSpec) -> dict:
    """d_int or its bound, the interval, monotonicity and per-d statistics of a search.

    Returns:
      ``{"d_int", "censored", "d_int_upper_bound", "d_int_lower_bound", "ci_low", "ci_high",
      "bracket": {"lo", "hi"}, "converged", "non_monotone", "non_monotone_dims", "per_dim",
      "success_probability"}``; ``per_dim`` holds each d's ``mean``, ``std``, ``values``,
      ``reached``, ``success_probability`` and ``finite`` (every seed finite).
    """
    dims, r = _table(record, spec)
    est = point_estimate(record, spec)
    ci_low, ci_high = interval(record, spec, est["d_int"])
    lo, hi = bracket(record.path)
    odd = non_monotone_dims(dims, r.mean(axis=1))
    per_dim, success = [], []
    for d in dims:
        v = record.values[d]
        mean = float(np.mean(v))
        ok = np.array([reaches(x, spec.target, spec.metric) for x in v])
        per_dim.append(
            {
                "dim": d,
                "mean": mean,
                "std": float(np.std(v, ddof=1)) if v.size > 1 else 0.0,
                "values": [float(x) for x in v],
                "reached": reaches(mean, spec.target, spec.metric),
                "success_probability": float(ok.mean()),
                "finite": bool(np.all(np.isfinite(v))),
            }
        )
        success.append(
            {
                "dim": d,
                "probability": float(ok.mean()),
                "seeds_reaching": int(ok.sum()),
                "num_seeds": int(v.size),
            }
        )
    return {
        **est,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "bracket": {"lo": lo, "hi": hi},
        "converged": lo is not None and hi is not None,
        "non_monotone": bool(odd),
        "non_monotone_dims": odd,
        "per_dim": per_dim,
        "success_probability": success,
    }


def _diverged_text(run: dict) -> str:
    if not run["diverged"]:
        return ""
    step = run.get("diverged_step")
    return " (diverged)" if step is None else f" (diverged at step {step})"


def search_notes(summary: dict, record: Evaluations, spec: SearchSpec, non_finite) -> list[str]:
    """The sentences that explain a result that is not a plain value with a bounded interval."""
    notes = []
    lo, hi = summary["bracket"]["lo"], summary["bracket"]["hi"]
    if hi is None:
        notes.append(f"the target is not reached at any evaluated d up to {spec.d_max}")
        if summary["d_int_lower_bound"] is not None:
            notes.append(f"censored: d_int > {summary['d_int_lower_bound']} (a lower bound)")
    elif lo is None:
        notes.append(
            f"the target is already reached at d_min = {hi}: d_int <= {hi} "
            "(censored: an upper bound)"
            if hi <= spec.d_min
            else f"the target is already reached at the smallest d tried, {hi}: d_int <= {hi} "
            "(censored: an upper bound)"
        )
    elif summary["d_int"] is None:
        low = summary["d_int_lower_bound"]
        notes.append(
            f"the mean at lo = {lo} is not finite, so the crossing cannot be interpolated: "
            f"censored, {'' if low is None else f'{low} < '}d_int <= {hi}"
        )
    if non_finite:
        runs = ", ".join(f"d = {r['dim']} seed {r['seed']}{_diverged_text(r)}" for r in non_finite)
        notes.append(
            f"non-finite or diverged runs (never reach the target, never interpolated): {runs}"
        )
    if summary["non_monotone"]:
        notes.append(
            "the mean curve is not monotone: it reaches the target at d = "
            f"{', '.join(map(str, summary['non_monotone_dims']))} but misses it at a larger "
            f"evaluated d; d_int is the crossing inside the search's final bracket [{lo}, {hi}]"
        )
    n_seeds = next(iter(record.values.values())).size if record.values else 0
    if summary["d_int"] is not None and n_seeds == 1:
        notes.append("one seed: no interval (a t-interval needs at least two seeds)")
    if summary["d_int"] is not None and n_seeds > 1:
        for end, side, where in (("ci_high", "upper", "above"), ("ci_low", "lower", "below")):
            if summary[end] is None:
                notes.append(
                    f"the interval's {side} end lies {where} the evaluated range "
                    f"({end} = null): more seeds or a wider search would bound it"
                )
    return notes


# ------------------------------------------------------------------------------ validation


def _check_args(
    fraction, baseline, metric, which, precision, d_start, d_min, d_max, n_bootstrap, ci_extend
):
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise UserError(f"fraction must be in (0, 1], got {fraction!r}")
    if metric not in METRICS:
        raise UserError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if which not in WHICH:
        raise UserError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if isinstance(baseline, str):
        if baseline != "own":
            raise UserError(f"baseline must be 'own' or a number, got {baseline!r}")
    elif isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise UserError(f"baseline must be 'own' or a number, got {baseline!r}")
    elif not math.isfinite(baseline) or baseline <= 0:
        raise UserError(f"a fixed baseline must be a finite number > 0, got {baseline!r}")
    elif metric == "val_accuracy" and baseline > 1:
        raise UserError(f"a fixed accuracy baseline must be in (0, 1], got {baseline!r}")
    if not (isinstance(precision, (int, float)) and math.isfinite(precision) and precision > 0):
        raise UserError(f"precision must be a finite number > 0 (relative), got {precision!r}")
    for name, v in (("d_start", d_start), ("d_min", d_min)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be an integer >= 1, got {v!r}")
    if d_min > d_start:
        raise UserError(f"d_min must be <= d_start, got d_min={d_min}, d_start={d_start}")
    if d_max is not None and (isinstance(d_max, bool) or not isinstance(d_max, int) or d_max < 1):
        raise UserError(f"d_max must be an integer >= 1 or None, got {d_max!r}")
    if d_max is not None and d_max < d_min:
        raise UserError(f"d_max must be >= d_min, got d_max={d_max}, d_min={d_min}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise UserError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    if isinstance(ci_extend, bool) or not isinstance(ci_extend, int) or ci_extend < 0:
        raise UserError(f"ci_extend must be an integer >= 0, got {ci_extend!r}")


# ------------------------------------------------------------------------------ the search


class _Trainer:
    """``measure(d)`` over training: evaluates all seeds of one d, counts new and reused runs."""

    def __init__(
        self,
        base: TrainConfig,
        out_dir: Path,
        seeds,
        metric,
        which,
        evaluate,
        data,
        progress,
        checkpoint=None,
    ):
        self.seeds, self.metric, self.which = seeds, metric, which
        self.records: dict[int, list[dict]] = {}
        self.counts = {"new": 0, "reused": 0}
        # (dim, seed) pairs already trained for this configuration and data: reused, not
        # counted as new. The key holds the data's fingerprint, so the data is loaded first.
        self.known: set[tuple[int, int]] = set()
        if evaluate is None:
            if data is None:
                data = load_checked_data(base)
            key = config_key(base, data=data_fingerprint(data))
            for r in _results.read_jsonl(out_dir / RUNS_FILE):
                try:
                    if r.get("config_key") == key:
                        self.known.add((int(r["dim"]), int(r["seed"])))
                except (KeyError, TypeError, ValueError):
                    continue

            def evaluate(dims, seeds_):
                return run_dims(
                    base, dims, seeds_, out_dir, data=data, progress=progress, checkpoint=checkpoint
                )

        self.evaluate = evaluate

    def __call__(self, d: int) -> np.ndarray:
        if d not in self.records:
            fresh = [s for s in self.seeds if (d, s) not in self.known]
            records = self.evaluate([d], self.seeds)
            by_seed = {int(r["seed"]): r for r in records if int(r["dim"]) == d}
            missing = [s for s in self.seeds if s not in by_seed]
            if missing:
                raise ValueError(f"evaluate returned no record for d = {d}, seeds {missing}")
            self.records[d] = [by_seed[s] for s in self.seeds]
            self.counts["new"] += len(fresh)
            self.counts["reused"] += len(self.seeds) - len(fresh)
            self.known.update((d, s) for s in self.seeds)
        return np.array([metric_value(r, self.metric, self.which) for r in self.records[d]])

    def num_params(self, d: int) -> int:
        self(d)
        return int(self.records[d][0]["num_params"])

    def non_finite(self) -> list[dict]:
        """Every evaluated (d, seed) whose metric is not finite or whose run diverged."""
        return [
            {
                "dim": d,
                "seed": int(r["seed"]),
                "diverged": bool(r.get("diverged", False)),
                "diverged_step": r.get("diverged_step"),
            }
            for d in sorted(self.records)
            for r in self.records[d]
            if not math.isfinite(metric_value(r, self.metric, self.which))
        ]

    def runs(self, field: str) -> list[dict]:
        return [
            {
                "dim": d,
                "seed": int(r["seed"]),
                field: metric_value(r, self.metric, self.which),
                "val_accuracy": r.get("val_accuracy"),
                "best_val_accuracy": r.get("best_val_accuracy"),
                "test_accuracy": r.get("test_accuracy"),
                "val_loss": r.get("val_loss"),
                "diverged": bool(r.get("diverged", False)),
                "wall_time_s": r.get("wall_time_s"),
            }
            for d in sorted(self.records)
            for r in self.records[d]
        ]


def check_baseline(values: np.ndarray, seeds: Sequence[int], trainer: _Trainer) -> None:
    """A baseline seed that diverged or is not finite makes the target meaningless: an error."""
    bad = [s for s, v in zip(seeds, values, strict=True) if not math.isfinite(v)]
    if not bad:
        return
    diverged = [r for r in trainer.non_finite() if r["dim"] == 0 and r["diverged"]]
    what = "diverged" if diverged else f"gave a non-finite {trainer.metric}"
    raise UserError(
        f"the baseline (direct training, d = 0) {what} for seed(s) {bad}, so there is no "
        "target to reach: lower the learning rate (--lr) and rerun, or give a fixed --baseline"
    )


def _baseline(baseline, trainer: _Trainer, seeds, metric, which):
    """``(values, mean, num_params, text)`` of the baseline (own: trains d = 0)."""
    if baseline != "own":
        text = f"the fixed value {float(baseline)}"
        return float(baseline), float(baseline), None, text
    values = trainer(0)
    check_baseline(values, seeds, trainer)
    text = (
        f"the mean {metric_field(metric, which).replace('_', ' ')} of direct training "
        f"(d = 0) over the same seeds"
    )
    return values, float(np.mean(values)), trainer.num_params(0), text


def search_intrinsic_dim(
    base: TrainConfig,
    out_dir: str | Path,
    *,
    fraction: float = 0.9,
    baseline: str | float = "own",
    metric: str = "val_accuracy",
    which: str = "final",
    precision: float = 0.2,
    d_start: int = 256,
    d_min: int = 1,
    d_max: int | None = None,
    n_bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    ci_extend: int = 2,
    data=None,
    evaluate: Evaluate | None = None,
    progress: Progress | None = None,
    write: bool = True,
    checkpoint=None,
) -> dict:
    """Search d_int for ``base`` (its ``seeds``; ``base.dim`` is ignored).

    Args:
      base: the training configuration; every evaluation trains ``base`` at one d for all
        ``base.seeds`` together (vmap).
      out_dir: folder for ``runs.jsonl`` (appended run by run, reused on rerun), ``id.json``
        and ``id.png``.
      fraction: threshold fraction in ``(0, 1]`` (0.9 gives d_int90).
      baseline: ``"own"`` (direct training of the same seeds, ``d = 0``) or a fixed number
        (e.g. 1.0 for MNIST accuracy as in Li et al. 2018's notebook).
      metric: ``"val_accuracy"`` or ``"val_loss"`` (a loss reaches the target when
        ``loss <= baseline / fraction``).
      which: ``"final"`` (last epoch) or ``"best"`` (best epoch; optimistic, as the epoch is
        chosen on the validation set).
      precision: stop bisecting when ``hi / lo - 1 <= precision``.
      d_start: first d tried.
      d_min: smallest d tried when halving.
      d_max: largest d tried (None: the model's number of parameters D).
      n_bootstrap: resamples for ``bootstrap_ci``, a percentile bootstrap kept for comparison
        (0: none); the reported interval is the t-interval.
      bootstrap_seed: seed of the resampling.
      ci_extend: after the bisection, evaluate up to this many more d values on each side
        (doubling above the largest evaluated d, halving below the smallest) while the
        interval reaches past the evaluated range; 0 disables.
      data: a loaded dataset (loaded once when None: its fingerprint is part of the key
        that decides which runs in ``runs.jsonl`` are reused).
      evaluate: ``(dims, seeds) -> records`` with one record per (d, seed) holding ``dim``,
        ``seed``, ``num_params`` and the metric fields; default :func:`run_dims`.
      progress: called with training events and ``{"event": "message", "text": ...}``.
      write: write ``id.json`` and ``id.png`` to ``out_dir``.
      checkpoint: :class:`~subspace_jax.train.CheckpointOptions`: every training checkpoints
        and resumes (see :func:`run_dims`); None: no checkpoints.

    Returns:
      A JSON-serialisable dict: ``d_int`` (None when censored), ``censored``,
      ``d_int_upper_bound``, ``d_int_lower_bound``, ``ci_low``, ``ci_high``,
      ``non_monotone``, ``non_finite_runs``, ``success_probability``, ``per_dim``, ``fraction``,
      ``baseline``, ``target``, ``metric``, ``which``, ``definition``, ``runs``,
      ``num_training_runs``, ``search_path``, ``bracket``, ``converged``, ``notes``, ``plot``.

    Raises:
      ValueError: for a bad argument (naming it and the allowed range), or a baseline seed
        that diverged or is not finite.

    Example:
      >>> from subspace_jax.train import TrainConfig
      >>> cfg = TrainConfig(projection="fastfood", seeds=(0, 1, 2), epochs=3)
      >>> res = search_intrinsic_dim(cfg, "results/id")  # doctest: +SKIP
      >>> res["d_int"], res["ci_low"], res["ci_high"]  # doctest: +SKIP
    """
    _check_args(
        fraction, baseline, metric, which, precision, d_start, d_min, d_max, n_bootstrap, ci_extend
    )
    out_dir = Path(out_dir)
    seeds = [int(s) for s in base.seeds]
    base = dataclasses.replace(base, dim=0)
    say = _messages(progress)
    trainer = _Trainer(base, out_dir, seeds, metric, which, evaluate, data, progress, checkpoint)
    base_values, base_mean, num_params, baseline_text = _baseline(
        baseline, trainer, seeds, metric, which
    )
    target = target_value(base_mean, fraction, metric)
    say(
        f"baseline {metric} ({which}) = {base_mean:.4f}; target "
        f"{'<=' if lower_is_better(metric) else '>='} {target:.4f}"
    )
    if num_params is None:  # a fixed baseline: D from the first subspace run
        num_params = trainer.num_params(d_start if d_max is None else min(d_start, d_max))
    d_max = num_params if d_max is None else min(d_max, num_params)
    spec = SearchSpec(fraction, metric, base_values, d_max, precision, d_start, d_min, ci_extend)
    record = run_search(trainer, spec, on_step=lambda p: say(_step_text(p, metric)))
    non_finite = [r for r in trainer.non_finite() if r["dim"] > 0]
    opts = dict(baseline=baseline, base_mean=base_mean, baseline_text=baseline_text, seeds=seeds)
    opts.update(which=which, n_bootstrap=n_bootstrap, bootstrap_seed=bootstrap_seed)
    result = _result(base, spec, record, summarise(record, spec), trainer, non_finite, opts)
    if write:
        write_search(out_dir, result, base)
    return result


def _messages(progress: Progress | None) -> Callable[[str], None]:
    """``say(text)``: a ``{"event": "message"}`` to ``progress`` (nothing when None)."""

    def say(text: str) -> None:
        if progress is not None:
            progress({"event": "message", "text": text})

    return say


def _step_text(p: dict, metric: str) -> str:
    """One search step as a progress line."""
    verdict = "reaches" if p["reached"] else "misses"
    return f"d = {p['dim']}: mean {metric} {p['mean']:.4f} {verdict} the target"


def bootstrap_interval(record: Evaluations, spec: SearchSpec, n_bootstrap: int, seed: int):
    """``(low, high, undefined_fraction)`` of the percentile bootstrap over finite d."""
    dims, _ = _table(record, spec)
    dims = [d for d in dims if np.all(np.isfinite(record.values[d]))]
    if not n_bootstrap or len(dims) < 1:
        return None, None, None
    values = np.array([record.values[d] for d in dims])
    samples = bootstrap_crossings(
        dims,
        values,
        spec.baseline,
        fraction=spec.fraction,
        metric=spec.metric,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    undefined = float(np.mean(~np.isfinite(samples)))
    return percentile_or_none(samples, 2.5), percentile_or_none(samples, 97.5), undefined


def _result(base, spec, record, summary, trainer, non_finite, opts) -> dict:
    """The JSON result of a search."""
    seeds = opts["seeds"]
    own = opts["baseline"] == "own"
    b_low, b_high, undefined = (None, None, None)
    if summary["d_int"] is not None and len(seeds) > 1:
        b_low, b_high, undefined = bootstrap_interval(
            record, spec, opts["n_bootstrap"], opts["bootstrap_seed"]
        )
    n_base = len(seeds) if own else 0
    label = f"d_int{round(spec.fraction * 100)}"
    return {
        "label": label,
        **{k: summary[k] for k in ("d_int", "censored", "d_int_upper_bound", "d_int_lower_bound")},
        "ci_low": summary["ci_low"],
        "ci_high": summary["ci_high"],
        "ci_level": spec.ci_level,
        "ci_method": "t-interval over seeds (Fieller) + interpolation-error allowance",
        "bootstrap_ci": None if b_low is None and b_high is None else [b_low, b_high],
        "n_bootstrap": opts["n_bootstrap"],
        "bootstrap_undefined_fraction": undefined,
        "fraction": spec.fraction,
        "metric": spec.metric,
        "which": opts["which"],
        "baseline": {
            "value": opts["base_mean"],
            "kind": "own" if own else "fixed",
            "definition": opts["baseline_text"],
            "per_seed": [float(v) for v in np.atleast_1d(spec.baseline)] if own else None,
        },
        "target": spec.target,
        "definition": search_definition(
            spec.fraction,
            spec.metric,
            opts["which"],
            opts["baseline_text"],
            seeds,
            spec.d_start,
            spec.precision,
            opts["n_bootstrap"],
        ),
        "num_params": trainer.num_params(0) if own else trainer.num_params(record.path[0]["dim"]),
        "seeds": seeds,
        "precision": spec.precision,
        "d_start": spec.d_start,
        "d_min": spec.d_min,
        "d_max": spec.d_max,
        "bracket": summary["bracket"],
        "converged": summary["converged"],
        "non_monotone": summary["non_monotone"],
        "non_monotone_dims": summary["non_monotone_dims"],
        "non_finite_runs": non_finite,
        "search_path": record.path,
        "per_dim": summary["per_dim"],
        "success_probability": summary["success_probability"],
        "runs": trainer.runs(metric_field(spec.metric, opts["which"])),
        "num_training_runs": {
            "this_invocation": trainer.counts["new"],
            "reused": trainer.counts["reused"],
            "total": sum(len(v) for v in trainer.records.values()),
            "grid_equivalent": {
                "grid_points": GRID_POINTS,
                "seeds": len(seeds),
                "runs": GRID_POINTS * len(seeds) + n_base,
                "runs_one_seed": GRID_POINTS + (1 if n_base else 0),
            },
        },
        "notes": search_notes(summary, record, spec, non_finite),
        "config": base.to_dict(),
        "plot": None,
    }


def write_search(out_dir: Path, result: dict, base: TrainConfig) -> None:
    """Write ``id.png`` and ``id.json`` (the plot's path into ``result["plot"]``)."""
    field = metric_field(result["metric"], result["which"])
    lower = lower_is_better(result["metric"])
    plot = _results.plot_accuracy_vs_dim(
        out_dir / ID_PLOT,
        result["runs"],
        baseline=result["baseline"]["value"],
        # The dotted line is drawn at fraction * baseline: for a loss the target is
        # baseline / fraction.
        fraction=1 / result["fraction"] if lower else result["fraction"],
        d_int=result["d_int"],
        metric=field,
        title=f"{base.model} on {base.dataset}, {base.projection} projection: {result['label']}",
        ci=None if result["ci_low"] is None else (result["ci_low"], result["ci_high"]),
    )
    result["plot"] = str(plot)
    _results.write_json(out_dir / ID_JSON, result)
