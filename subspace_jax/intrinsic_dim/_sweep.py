"""The d-sweep: a grid of d values x seeds plus the direct baseline, resumable run by run.

Every finished run is appended at once to ``runs.jsonl`` in the output folder, one record per
seed, so an interrupted sweep keeps what it finished, and a rerun reuses every record whose
configuration matches (same model, projection, optimiser settings and every other config
field, the same data by the fingerprint of its contents, d and seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from subspace_jax import _results
from subspace_jax._errors import UserError
from subspace_jax.data import data_fingerprint
from subspace_jax.intrinsic_dim._stats import (
    grid_estimate,
    lower_is_better,
    margins,
    metric_value,
    non_monotone_dims,
    target_value,
)
from subspace_jax.projections import LR_RULE
from subspace_jax.train import (
    CheckpointOptions,
    TrainConfig,
    check_config,
    load_data,
    remove_checkpoints,
    train_and_evaluate,
)
from subspace_jax.train._reuse import KEY_FIELDS

RUNS_FILE = "runs.jsonl"


def config_key(config: TrainConfig, *, data: str) -> str:
    """A stable hash of everything that defines a run except its dimension and seeds.

    Args:
      config: the run's configuration; its fields in ``KEY_FIELDS``
        (``subspace_jax/train/_reuse.py``, where every field is classified) enter the key;
        a ``theta0_path`` enters with a hash of the file's bytes.
      data: the fingerprint of the data actually loaded
        (:func:`~subspace_jax.data.data_fingerprint`), so other data under the same name
        never reuses a run.

    Returns:
      12 hex digits.
    """
    fields = config.to_dict()  # leaves the later fields out at their default
    d = {k: fields[k] for k in KEY_FIELDS if k in fields}
    if config.lr is None:  # the default learning rate follows a rule: a new rule retrains
        d["lr_rule"] = LR_RULE
    if config.theta0_path is not None:
        d["theta0_sha256"] = _file_sha256(config.theta0_path)
    d["data_fingerprint"] = str(data)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seed_records(result: dict, config: TrainConfig) -> list[dict]:
    """Split a (possibly multi-seed) training result into one record per seed.

    ``diverged`` and ``diverged_step`` are copied from each seed's result (False and None where
    the trainer does not report them); ``result["data_fingerprint"]`` (set by
    ``train_and_evaluate``) enters the record's ``config_key`` and is stored as
    ``data_fingerprint``.
    """
    fingerprint = result.get("data_fingerprint", "unknown")
    key = config_key(config, data=fingerprint)
    out = []
    for i, s in enumerate(result["per_seed"]):
        out.append(
            {
                "config_key": key,
                "model": result["model"],
                "dataset": result["dataset"],
                "projection": result["projection"],
                "num_params": result["num_params"],
                "dim": result["dim"],
                "seed": s["seed"],
                "val_accuracy": s["val_accuracy"],
                "best_val_accuracy": s["best_val_accuracy"],
                "test_accuracy": s["test_accuracy"],
                "diverged": bool(s.get("diverged", False)),
                "diverged_step": s.get("diverged_step"),
                "val_loss": result["history"][-1]["per_seed_val_loss"][i],
                "val_loss_curve": [h["per_seed_val_loss"][i] for h in result["history"]],
                "val_curve": [h["per_seed_val_accuracy"][i] for h in result["history"]],
                "train_loss_curve": [h["per_seed_train_loss"][i] for h in result["history"]],
                "step_time_ms": result["step_time_ms"],
                "peak_memory_bytes": result["peak_memory_bytes"],
                "wall_time_s": result["wall_time_s"],
                # The rate this seed finished with (lower after --on-divergence retry).
                "learning_rate": s.get("learning_rate", result["learning_rate"]),
                "epochs": config.epochs,
                "data_fingerprint": fingerprint,
            }
        )
    return out


def run_dims(
    base: TrainConfig,
    dims: Sequence[int],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    data=None,
    progress: Callable[[dict], None] | None = None,
    reuse: bool = True,
    checkpoint: CheckpointOptions | None = None,
) -> list[dict]:
    """Train every ``d`` in ``dims`` (0 = direct) for every seed, reusing finished records.

    Seeds of one d that still need training are trained together (vmapped). Each d's records
    are appended to ``out_dir/runs.jsonl`` as soon as it finishes. A record is reused when its
    ``config_key`` (the configuration and the data's fingerprint) and its d and seed match;
    the data is loaded (when ``data`` is None) to compute that fingerprint.

    Returns:
      All matching records (reused and new) for the requested dims and seeds. With
      ``checkpoint``, each training resumes from its checkpoints, removed once its records
      are written.
    """
    out_dir = Path(out_dir)
    runs_path = out_dir / RUNS_FILE
    if data is None:
        data = load_data(base)  # the data's fingerprint is part of every run's key
    fingerprint = data_fingerprint(data)
    have: dict[tuple[str, int, int], dict] = {}
    if reuse:
        for rec in _results.read_jsonl(runs_path):
            try:
                have[(rec["config_key"], int(rec["dim"]), int(rec["seed"]))] = rec
            except (KeyError, TypeError, ValueError):
                continue  # not a run record of ours
    records = []
    for dim in dims:
        cfg = dataclasses.replace(base, dim=int(dim))
        key = config_key(cfg, data=fingerprint)
        todo = [s for s in seeds if (key, int(dim), int(s)) not in have]
        if todo:
            if progress is not None:
                progress({"event": "run_start", "dim": int(dim), "seeds": list(todo)})
            cfg = dataclasses.replace(cfg, seeds=tuple(int(s) for s in todo))
            result = train_and_evaluate(cfg, data, progress=progress, checkpoint=checkpoint)
            result = result.result
            result.setdefault("data_fingerprint", fingerprint)
            for rec in seed_records(result, cfg):
                _results.append_jsonl(runs_path, rec)
                have[(key, int(dim), int(rec["seed"]))] = rec
            if checkpoint is not None:
                remove_checkpoints(checkpoint, cfg, data)
            if progress is not None:
                progress(
                    {
                        "event": "run_end",
                        "dim": int(dim),
                        "val_accuracy": result["val_accuracy"],
                        "wall_time_s": result["wall_time_s"],
                        # For the logs (subspace_jax._logs): the test metrics per seed.
                        **{
                            k: result.get(k)
                            for k in ("steps", "test_accuracy", "test_loss", "per_seed")
                        },
                    }
                )
        elif progress is not None:
            progress({"event": "run_reused", "dim": int(dim), "seeds": [int(s) for s in seeds]})
        records.extend(have[(key, int(dim), int(s))] for s in seeds)
    return records


def sweep_definition(fraction: float, metric: str = "val_accuracy") -> str:
    name = metric.replace("_", " ")
    if lower_is_better(metric):
        rule = (
            f"falls to or below the direct baseline's mean {name} over the same seeds / {fraction}"
        )
    else:
        rule = f"reaches {fraction} x the direct baseline's mean {name} over the same seeds"
    return (
        f"d_int{round(fraction * 100)}: the smallest subspace dimension d at which the mean "
        f"{name} over seeds (final epoch) {rule}; interpolated linearly in log(d) between the "
        "last grid point below the threshold and the first at or above it. A run that is not "
        "finite or diverged never reaches the threshold and is never interpolated. If the "
        "first grid point already reaches the threshold, no grid point does, or the point "
        "before the first reaching one is not finite, d_int is null and the result is censored: "
        "d_int_upper_bound and/or d_int_lower_bound bound it."
    )


def describe_estimate(summary: dict) -> str:
    """``612``, ``<= 100 (censored)``, ``> 1000 (censored: not reached)`` or ``not reached``."""
    if summary["d_int"] is not None:
        return f"{summary['d_int']:,.0f}"
    up, low = summary.get("d_int_upper_bound"), summary.get("d_int_lower_bound")
    if up is not None and low is not None:
        return f"in ({low:,}, {up:,}] (censored)"
    if up is not None:
        return f"<= {up:,} (censored)"
    if low is not None:
        return f"> {low:,} (censored: not reached)"
    return "not reached"


def summarize_sweep(
    baseline_records: Sequence[dict],
    records: Sequence[dict],
    *,
    fraction: float = 0.9,
    metric: str = "val_accuracy",
) -> dict:
    """d_int (interpolated) or its bound, and the per-d means, from the records of a sweep.

    ``metric`` decides the direction (a loss reaches the threshold ``baseline / fraction``
    from above). Non-finite and diverged runs make their d's mean non-finite: it never
    reaches the threshold and is never interpolated; they are listed in ``non_finite_runs``.

    Returns:
      ``{"baseline_accuracy", "threshold", "fraction", "metric", "dims", "mean_accuracy",
      "d_int", "censored", "d_int_upper_bound", "d_int_lower_bound", "non_monotone",
      "non_finite_runs", "notes", "definition"}`` (``baseline_accuracy`` and ``mean_accuracy``
      hold ``metric``, whatever it is).
    """
    base_values = np.array([metric_value(r, metric, "final") for r in baseline_records])
    baseline = float(np.mean(base_values))
    dims = sorted({int(r["dim"]) for r in records if int(r["dim"]) > 0})
    means = [
        float(np.mean([metric_value(r, metric, "final") for r in records if int(r["dim"]) == d]))
        for d in dims
    ]
    notes = []
    if np.isfinite(baseline):
        mean_margins = margins(means, baseline, fraction, metric)
        est = grid_estimate(dims, mean_margins)
        odd = non_monotone_dims(dims, mean_margins)
    else:
        est = grid_estimate([], [])
        odd = []
        notes.append("the baseline is not finite (a run diverged): there is no threshold")
    bad = [
        {"dim": int(r["dim"]), "seed": int(r["seed"]), "diverged": bool(r.get("diverged", False))}
        for r in [*baseline_records, *records]
        if not np.isfinite(metric_value(r, metric, "final"))
    ]
    notes += _sweep_notes(dims, est, odd, bad)
    return {
        "baseline_accuracy": baseline,
        "threshold": target_value(baseline, fraction, metric),
        "fraction": fraction,
        "metric": metric,
        "dims": dims,
        "mean_accuracy": means,
        **est,
        "non_monotone": bool(odd),
        "non_finite_runs": bad,
        "notes": notes,
        "definition": sweep_definition(fraction, metric),
    }


def _sweep_notes(dims: list[int], est: dict, odd: list[int], bad: list[dict]) -> list[str]:
    """The notes of a sweep: non-finite runs, a censored estimate, a non-monotone curve."""
    notes = []
    if bad:
        notes.append(
            "non-finite or diverged runs (never reach the threshold, never interpolated): "
            + ", ".join(
                f"d = {b['dim']} seed {b['seed']}{' (diverged)' if b['diverged'] else ''}"
                for b in bad
            )
        )
    if est["d_int_upper_bound"] is not None and est["d_int_lower_bound"] is None:
        upper = est["d_int_upper_bound"]
        where = "the first grid point" if upper == dims[0] else "the first finite grid point"
        notes.append(
            f"censored: {where} d = {upper} already reaches the threshold, so "
            f"d_int <= {upper} (add smaller d to measure it)"
        )
    elif est["d_int_upper_bound"] is None and est["d_int_lower_bound"] is not None:
        notes.append(
            f"censored: no grid point reaches the threshold, d_int > {est['d_int_lower_bound']}"
        )
    elif est["censored"]:
        notes.append(
            "censored: the grid point before the first reaching one is not finite, so "
            f"{est['d_int_lower_bound']} < d_int <= {est['d_int_upper_bound']}"
        )
    if odd:
        notes.append(
            f"the mean curve is not monotone: it reaches the threshold at d = "
            f"{', '.join(map(str, odd))} but misses it at a larger d; d_int is the first crossing"
        )
    return notes


def check_sweep_baseline(baseline_runs: Sequence[dict], metric: str) -> None:
    """Raise before training the grid when a baseline seed diverged or is not finite."""
    bad = [
        int(r["seed"]) for r in baseline_runs if not np.isfinite(metric_value(r, metric, "final"))
    ]
    if bad:
        what = "diverged" if any(r.get("diverged") for r in baseline_runs) else "is not finite"
        raise UserError(
            f"the baseline (direct training, d = 0) {what} for seed(s) {bad}, so there is no "
            "threshold to reach: lower the learning rate (--lr) and rerun"
        )


def load_checked_data(base: TrainConfig):
    """``base``'s data, checked to serve it (a batch no larger than the training split, a
    non-empty validation split): a :class:`~subspace_jax.UserError` otherwise."""
    data = load_data(base)
    check_config(base, data)
    return data


def run_sweep(
    base: TrainConfig,
    dims: Sequence[int],
    out_dir: str | Path,
    *,
    fraction: float = 0.9,
    metric: str = "val_accuracy",
    progress: Callable[[dict], None] | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> dict:
    """The full sweep: baseline (d = 0) and every d, for ``base.seeds``; writes the plot.

    Returns:
      ``{"baseline": {...}, "runs": [...], "d_int90": number|None, "censored": bool,
      "d_int_upper_bound", "d_int_lower_bound", "non_monotone", "non_finite_runs", "notes",
      "definition": str, ...}``; ``d_int90`` holds the crossing at ``fraction`` (0.9 unless
      changed), null when censored.

    Raises:
      UserError: a bad argument, a d out of range, a batch larger than the training split, or
        a baseline seed that diverged or is not finite (before the grid is trained).
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    if metric not in ("val_accuracy", "val_loss"):
        raise UserError(f"metric must be one of val_accuracy, val_loss, got {metric!r}")
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 1:
        raise UserError(f"sweep dims must be integers >= 1, got {dims}")
    out_dir = Path(out_dir)
    seeds = list(base.seeds)
    for d in dims:  # every d's sizes, before the baseline trains
        check_config(dataclasses.replace(base, dim=d))
    data = load_checked_data(base)
    kw = dict(data=data, progress=progress, checkpoint=checkpoint)
    baseline_runs = run_dims(base, [0], seeds, out_dir, **kw)
    check_sweep_baseline(baseline_runs, metric)
    runs = run_dims(base, dims, seeds, out_dir, **kw)
    summary = summarize_sweep(baseline_runs, runs, fraction=fraction, metric=metric)
    plot = _results.plot_accuracy_vs_dim(
        out_dir / "sweep.png",
        runs,
        baseline=summary["baseline_accuracy"],
        fraction=1 / fraction if lower_is_better(metric) else fraction,
        d_int=summary["d_int"],
        metric=metric,
        title=f"{base.model} on {base.dataset}, {base.projection} projection",
    )
    keys = ("censored", "d_int_upper_bound", "d_int_lower_bound", "non_monotone")
    return {
        "baseline": {
            "val_accuracy": float(
                np.mean([metric_value(r, "val_accuracy", "final") for r in baseline_runs])
            ),
            "value": summary["baseline_accuracy"],
            "num_params": baseline_runs[0]["num_params"],
            "runs": baseline_runs,
        },
        "runs": runs,
        "d_int90": summary["d_int"],
        **{k: summary[k] for k in keys},
        "non_finite_runs": summary["non_finite_runs"],
        "notes": summary["notes"],
        "fraction": fraction,
        "metric": metric,
        "threshold": summary["threshold"],
        "dims": summary["dims"],
        "mean_accuracy": summary["mean_accuracy"],
        "definition": summary["definition"],
        "config": base.to_dict(),
        "plot": str(plot),
    }
