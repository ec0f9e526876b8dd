"""The automatic intrinsic-dimension search: bracket by doubling, bisect in log d, bootstrap.

``search_intrinsic_dim`` finds d_int (by default d_int90) with far fewer trainings than a
grid:

1. The baseline: direct training (``d = 0``) of every seed, or a fixed number.
2. The target: ``fraction x baseline`` for an accuracy; ``baseline / fraction`` for a loss
   (a loss *reaches* the target when it is at or below it).
3. Bracketing: train ``d_start``; while the mean metric over seeds misses the target, double
   d (up to ``d_max``, by default the model's D); if ``d_start`` already reaches it, halve d
   instead (down to ``d_min``) until it does not.
4. Bisection in ``log d`` between the largest failing d (``lo``) and the smallest succeeding d
   (``hi``), at the rounded geometric midpoint, until ``hi / lo - 1 <= precision`` (or
   ``hi - lo <= 1``).
5. The interval: the crossing recomputed on bootstrap resamples of the seeds (the 2.5 and
   97.5 percentiles). Resamples of the weaker seeds cross above ``hi``, so while the upper
   percentile lies beyond the largest evaluated d the search doubles it once more (at most
   ``ci_extend`` times; likewise halving below the smallest d for the lower percentile).
6. d_int: the crossing of the mean curve through every evaluated d, interpolated linearly in
   ``log d`` (:func:`~subspace_jax.intrinsic_dim.interpolate_crossing`), and the success
   probability of each d (Larsen et al. 2022): the fraction of seeds whose own run reaches
   the target.

Every evaluation goes through ``evaluate(dims, seeds) -> records`` (by default
:func:`~subspace_jax.intrinsic_dim.run_dims`, which trains the seeds of one d together under
``vmap``, appends each record to ``out_dir/runs.jsonl`` at once, and reuses the records already
there). The search path is deterministic given the records, so a second call, say with a
tighter ``precision``, retraces the first from ``runs.jsonl`` and trains only the new d values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from subspace_jax import _results
from subspace_jax.data import data_fingerprint
from subspace_jax.intrinsic_dim._sweep import (
    RUNS_FILE,
    config_key,
    interpolate_crossing,
    run_dims,
)
from subspace_jax.train import TrainConfig, load_data

METRICS = ("val_accuracy", "val_loss")
WHICH = ("final", "best")
#: Points of the grid the search is compared with (``num_training_runs.grid_equivalent``).
GRID_POINTS = 10
ID_JSON = "id.json"
ID_PLOT = "id.png"

Evaluate = Callable[[Sequence[int], Sequence[int]], list[dict]]
Progress = Callable[[dict], None]


# ------------------------------------------------------------------------------ metric rules


def metric_value(record: dict, metric: str, which: str) -> float:
    """The value of ``metric`` in one per-seed record (``which``: final or best epoch)."""
    if metric == "val_loss":
        if which == "best":
            return float(min(record["val_loss_curve"]))
        return float(record["val_loss"])
    return float(record["val_accuracy" if which == "final" else "best_val_accuracy"])


def metric_field(metric: str, which: str) -> str:
    """The record field the metric is read from (``val_accuracy`` or ``best_val_accuracy``)."""
    return metric if which == "final" else f"best_{metric}"


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def target_value(baseline: float, fraction: float, metric: str) -> float:
    """``fraction x baseline`` for an accuracy, ``baseline / fraction`` for a loss."""
    return baseline / fraction if lower_is_better(metric) else fraction * baseline


def reaches(value: float, target: float, metric: str) -> bool:
    """Accuracy at or above the target; loss at or below it."""
    return value <= target if lower_is_better(metric) else value >= target


def crossing(dims: Sequence[float], means: Sequence[float], target: float, metric: str):
    """Smallest d where the mean curve reaches ``target`` (log-d interpolation), or None."""
    if lower_is_better(metric):
        return interpolate_crossing(dims, [-m for m in means], -target)
    return interpolate_crossing(dims, means, target)


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
    """The crossing recomputed on ``n_bootstrap`` resamples of the seeds (with replacement).

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
    return (
        f"{label}: the smallest subspace dimension d at which the mean {what} over seeds "
        f"{list(seeds)} {rule}, the baseline being {baseline_text}. Found by doubling d from "
        f"{d_start} (halving if {d_start} already reaches the target) until the mean crosses "
        f"the target, then bisecting in log d until hi/lo - 1 <= {precision}; the value is "
        "interpolated linearly in log d between the last evaluated d below the target and the "
        f"first at or above it. The 95% interval is the 2.5-97.5 percentile range of the same "
        f"crossing over {n_bootstrap} bootstrap resamples of the seeds (baseline and subspace "
        "runs resampled together; d is doubled beyond the bracket, or halved below it, while "
        "the interval reaches past the evaluated range). success_probability is the fraction "
        "of seeds whose own run reaches the target (Larsen et al. 2022)."
    )


# ------------------------------------------------------------------------------ validation


def _check_args(
    fraction, baseline, metric, which, precision, d_start, d_min, d_max, n_bootstrap, ci_extend
):
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if isinstance(baseline, str):
        if baseline != "own":
            raise ValueError(f"baseline must be 'own' or a number, got {baseline!r}")
    elif isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise ValueError(f"baseline must be 'own' or a number, got {baseline!r}")
    elif not math.isfinite(baseline) or baseline <= 0:
        raise ValueError(f"a fixed baseline must be a finite number > 0, got {baseline!r}")
    elif metric == "val_accuracy" and baseline > 1:
        raise ValueError(f"a fixed accuracy baseline must be in (0, 1], got {baseline!r}")
    if not (isinstance(precision, (int, float)) and math.isfinite(precision) and precision > 0):
        raise ValueError(f"precision must be a finite number > 0 (relative), got {precision!r}")
    for name, v in (("d_start", d_start), ("d_min", d_min)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if d_min > d_start:
        raise ValueError(f"d_min must be <= d_start, got d_min={d_min}, d_start={d_start}")
    if d_max is not None and (isinstance(d_max, bool) or not isinstance(d_max, int) or d_max < 1):
        raise ValueError(f"d_max must be an integer >= 1 or None, got {d_max!r}")
    if d_max is not None and d_max < d_min:
        raise ValueError(f"d_max must be >= d_min, got d_max={d_max}, d_min={d_min}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    if isinstance(ci_extend, bool) or not isinstance(ci_extend, int) or ci_extend < 0:
        raise ValueError(f"ci_extend must be an integer >= 0, got {ci_extend!r}")


# ------------------------------------------------------------------------------ the search


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
      which: ``"final"`` (last epoch) or ``"best"`` (best epoch, accuracy only; optimistic, as
        the epoch is chosen on the validation set).
      precision: stop bisecting when ``hi / lo - 1 <= precision``.
      d_start: first d tried.
      d_min: smallest d tried when halving.
      d_max: largest d tried (None: the model's number of parameters D).
      n_bootstrap: bootstrap resamples of the seeds for the interval (0: no interval).
      bootstrap_seed: seed of the resampling.
      ci_extend: after the bisection, evaluate up to this many more d values on each side
        (doubling above the largest evaluated d, halving below the smallest) while the
        bootstrap interval reaches past the evaluated range; 0 disables.
      data: a loaded dataset (loaded once when None: its fingerprint is part of the key
        that decides which runs in ``runs.jsonl`` are reused).
      evaluate: ``(dims, seeds) -> records`` with one record per (d, seed) holding ``dim``,
        ``seed``, ``num_params`` and the metric fields; default :func:`run_dims`.
      progress: called with training events and ``{"event": "message", "text": ...}``.
      write: write ``id.json`` and ``id.png`` to ``out_dir``.

    Returns:
      A JSON-serialisable dict: ``d_int`` (None if the target is not reached by ``d_max``),
      ``ci_low``, ``ci_high``, ``success_probability``, ``per_dim``, ``fraction``,
      ``baseline``, ``target``, ``metric``, ``which``, ``definition``, ``runs``,
      ``num_training_runs``, ``search_path``, ``bracket``, ``converged``, ``notes``, ``plot``.

    Raises:
      ValueError: for a bad argument (naming it and the allowed range).

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

    def say(text: str) -> None:
        if progress is not None:
            progress({"event": "message", "text": text})

    # (dim, seed) pairs already trained for this configuration and data: reused, not counted
    # as new. The key holds the data's fingerprint, so the data is loaded first.
    known: set[tuple[int, int]] = set()
    if evaluate is None:
        if data is None:
            data = load_data(base)
        key = config_key(base, data=data_fingerprint(data))
        for r in _results.read_jsonl(out_dir / RUNS_FILE):
            try:
                if r.get("config_key") == key:
                    known.add((int(r["dim"]), int(r["seed"])))
            except (KeyError, TypeError, ValueError):
                continue

        def evaluate(dims, seeds_):
            return run_dims(base, dims, seeds_, out_dir, data=data, progress=progress)

    evaluated: dict[int, list[dict]] = {}
    path: list[dict] = []
    counts = {"new": 0, "reused": 0}

    def run(d: int) -> float:
        if d not in evaluated:
            fresh = [s for s in seeds if (d, s) not in known]
            records = list(evaluate([d], seeds))
            by_seed = {int(r["seed"]): r for r in records if int(r["dim"]) == d}
            missing = [s for s in seeds if s not in by_seed]
            if missing:
                raise ValueError(f"evaluate returned no record for d = {d}, seeds {missing}")
            evaluated[d] = [by_seed[s] for s in seeds]
            counts["new"] += len(fresh)
            counts["reused"] += len(seeds) - len(fresh)
            known.update((d, s) for s in seeds)
        return float(np.mean([metric_value(r, metric, which) for r in evaluated[d]]))

    # 1. The baseline and the target.
    if baseline == "own":
        base_mean = run(0)
        base_values = np.array([metric_value(r, metric, which) for r in evaluated[0]])
        num_params = int(evaluated[0][0]["num_params"])
        baseline_text = (
            f"the mean {metric_field(metric, which).replace('_', ' ')} of direct training "
            f"(d = 0) over the same seeds"
        )
    else:
        base_mean = float(baseline)
        base_values = base_mean
        num_params = None
        baseline_text = f"the fixed value {base_mean}"
    target = target_value(base_mean, fraction, metric)
    say(
        f"baseline {metric} ({which}) = {base_mean:.4f}; target "
        f"{'<=' if lower_is_better(metric) else '>='} {target:.4f}"
    )

    phase = {"name": "bracket"}

    def ok(d: int) -> bool:
        mean = run(d)
        good = reaches(mean, target, metric)
        path.append({"dim": d, "mean": mean, "reached": good, "phase": phase["name"]})
        say(f"d = {d}: mean {metric} {mean:.4f} {'reaches' if good else 'misses'} the target")
        return good

    def upper_limit() -> int:
        limit = d_max if d_max is not None else num_params
        if num_params is not None:
            limit = min(limit, num_params)
        return limit

    notes: list[str] = []
    # 2. Bracket: lo = largest failing d, hi = smallest succeeding d.
    lo = hi = None
    d = d_start if num_params is None else min(d_start, upper_limit())
    d = d if d_max is None else min(d, d_max)
    if ok(d):
        hi = d
        if num_params is None:
            num_params = int(evaluated[d][0]["num_params"])
        while d > d_min:
            d = max(d_min, d // 2)
            if ok(d):
                hi = d
            else:
                lo = d
                break
    else:
        lo = d
        if num_params is None:
            num_params = int(evaluated[d][0]["num_params"])
        while d < upper_limit():
            d = min(2 * d, upper_limit())
            if ok(d):
                hi = d
                break
            lo = d
    # 3. Bisection in log d.
    phase["name"] = "bisect"
    if lo is not None and hi is not None:
        while hi / lo - 1 > precision and hi - lo > 1:
            mid = int(round(math.sqrt(lo * hi)))
            mid = min(max(mid, lo + 1), hi - 1)
            if ok(mid):
                hi = mid
            else:
                lo = mid
    converged = lo is not None and hi is not None
    if hi is None:
        notes.append(f"the target is not reached at any evaluated d up to {upper_limit()}")
    if lo is None:
        notes.append(f"the target is already reached at d_min = {d_min}: d_int <= {d_min}")

    def table():
        dims = sorted(k for k in evaluated if k > 0)
        values = np.array([[metric_value(r, metric, which) for r in evaluated[k]] for k in dims])
        return dims, values

    def resample():
        dims, values = table()
        return dims, bootstrap_crossings(
            dims,
            values,
            base_values,
            fraction=fraction,
            metric=metric,
            n_bootstrap=n_bootstrap,
            seed=bootstrap_seed,
        )

    # 4. Widen the evaluated range until the bootstrap interval is bounded by evaluated points:
    # resamples of weaker seeds cross above hi, of stronger seeds below lo.
    phase["name"] = "ci"
    if converged and n_bootstrap > 0 and len(seeds) > 1:
        for _ in range(ci_extend):
            dims, samples = resample()
            if percentile_or_none(samples, 97.5) is not None or dims[-1] >= upper_limit():
                break
            ok(min(2 * dims[-1], upper_limit()))
        for _ in range(ci_extend):
            dims, samples = resample()
            low = percentile_or_none(samples, 2.5)
            if low is None or low > dims[0] or dims[0] <= d_min:
                break
            ok(max(d_min, dims[0] // 2))

    # 5. d_int, the bootstrap interval and the success probabilities.
    dims, values = table()
    means = values.mean(axis=1)
    d_int = crossing(dims, list(means), target, metric)
    ci_low = ci_high = None
    undefined = None
    if n_bootstrap > 0 and d_int is not None:
        _, samples = resample()
        undefined = float(np.mean(~np.isfinite(samples)))
        ci_low = percentile_or_none(samples, 2.5)
        ci_high = percentile_or_none(samples, 97.5)
        if ci_high is None:
            notes.append(
                f"in {undefined:.1%} of the bootstrap resamples the target is not reached at any "
                "evaluated d, so the interval has no upper end (ci_high = null)"
            )
        if ci_low is not None and ci_low <= dims[0] and dims[0] > d_min:
            notes.append(
                f"the interval's lower end is censored at the smallest evaluated d = {dims[0]}"
            )
    if len(seeds) == 1:
        notes.append("one seed: the bootstrap interval is degenerate (a single value)")
    per_seed_ok = np.array([[reaches(v, target, metric) for v in row] for row in values])
    per_dim = [
        {
            "dim": k,
            "mean": float(means[i]),
            "std": float(values[i].std(ddof=1)) if len(seeds) > 1 else 0.0,
            "values": [float(v) for v in values[i]],
            "reached": bool(reaches(means[i], target, metric)),
            "success_probability": float(per_seed_ok[i].mean()),
        }
        for i, k in enumerate(dims)
    ]
    success = [
        {
            "dim": k,
            "probability": float(per_seed_ok[i].mean()),
            "seeds_reaching": int(per_seed_ok[i].sum()),
            "num_seeds": len(seeds),
        }
        for i, k in enumerate(dims)
    ]

    field = metric_field(metric, which)
    runs = [
        {
            "dim": k,
            "seed": int(r["seed"]),
            field: metric_value(r, metric, which),
            "val_accuracy": r.get("val_accuracy"),
            "best_val_accuracy": r.get("best_val_accuracy"),
            "test_accuracy": r.get("test_accuracy"),
            "val_loss": r.get("val_loss"),
            "wall_time_s": r.get("wall_time_s"),
        }
        for k in sorted(evaluated)
        for r in evaluated[k]
    ]
    n_base = len(seeds) if baseline == "own" else 0
    total = sum(len(v) for v in evaluated.values())
    label = f"d_int{round(fraction * 100)}"
    result = {
        "label": label,
        "d_int": d_int,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "ci_level": 0.95,
        "n_bootstrap": n_bootstrap,
        "bootstrap_undefined_fraction": undefined,
        "fraction": fraction,
        "metric": metric,
        "which": which,
        "baseline": {
            "value": base_mean,
            "kind": "own" if baseline == "own" else "fixed",
            "definition": baseline_text,
            "per_seed": [float(v) for v in np.atleast_1d(base_values)] if n_base else None,
        },
        "target": target,
        "definition": search_definition(
            fraction, metric, which, baseline_text, seeds, d_start, precision, n_bootstrap
        ),
        "num_params": num_params,
        "seeds": seeds,
        "precision": precision,
        "d_start": d_start,
        "d_min": d_min,
        "d_max": upper_limit(),
        "bracket": {"lo": lo, "hi": hi},
        "converged": converged,
        "search_path": path,
        "per_dim": per_dim,
        "success_probability": success,
        "runs": runs,
        "num_training_runs": {
            "this_invocation": counts["new"],
            "reused": counts["reused"],
            "total": total,
            "grid_equivalent": {
                "grid_points": GRID_POINTS,
                "seeds": len(seeds),
                "runs": GRID_POINTS * len(seeds) + n_base,
                "runs_one_seed": GRID_POINTS + (1 if n_base else 0),
            },
        },
        "notes": notes,
        "config": base.to_dict(),
        "plot": None,
    }
    if write:
        plot = _results.plot_accuracy_vs_dim(
            out_dir / ID_PLOT,
            runs,
            baseline=base_mean,
            # The dotted line is drawn at fraction * baseline: for a loss the target is
            # baseline / fraction.
            fraction=1 / fraction if lower_is_better(metric) else fraction,
            d_int=d_int,
            metric=field,
            title=f"{base.model} on {base.dataset}, {base.projection} projection: {label}",
            ci=None if ci_low is None else (ci_low, ci_high),
        )
        result["plot"] = str(plot)
        _results.write_json(out_dir / ID_JSON, result)
    return result
