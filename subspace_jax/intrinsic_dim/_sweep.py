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
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from subspace_jax import _results
from subspace_jax.data import data_fingerprint
from subspace_jax.projections import LR_RULE
from subspace_jax.train import TrainConfig, load_data, train_and_evaluate

RUNS_FILE = "runs.jsonl"


def config_key(config: TrainConfig, *, data: str) -> str:
    """A stable hash of everything that defines a run except its dimension and seeds.

    Args:
      config: the run's configuration; every field enters the key except ``dim`` and
        ``seeds`` (stored beside it) and ``data_dir`` (the same data read from another folder
        may be reused); a ``theta0_path`` enters with a hash of the file's bytes.
      data: the fingerprint of the data actually loaded
        (:func:`~subspace_jax.data.data_fingerprint`), so other data under the same name
        never reuses a run.

    Returns:
      12 hex digits.
    """
    d = config.to_dict()
    for k in ("seeds", "dim", "data_dir"):
        d.pop(k, None)
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

    ``result["data_fingerprint"]`` (set by ``train_and_evaluate``) enters the record's
    ``config_key`` and is stored as ``data_fingerprint``.
    """
    key = config_key(config, data=result["data_fingerprint"])
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
                "val_loss": result["history"][-1]["per_seed_val_loss"][i],
                "val_loss_curve": [h["per_seed_val_loss"][i] for h in result["history"]],
                "val_curve": [h["per_seed_val_accuracy"][i] for h in result["history"]],
                "train_loss_curve": [h["per_seed_train_loss"][i] for h in result["history"]],
                "step_time_ms": result["step_time_ms"],
                "peak_memory_bytes": result["peak_memory_bytes"],
                "wall_time_s": result["wall_time_s"],
                "learning_rate": result["learning_rate"],
                "epochs": config.epochs,
                "data_fingerprint": result["data_fingerprint"],
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
) -> list[dict]:
    """Train every ``d`` in ``dims`` (0 = direct) for every seed, reusing finished records.

    Seeds of one d that still need training are trained together (vmapped). Each d's records
    are appended to ``out_dir/runs.jsonl`` as soon as it finishes. A record is reused when its
    ``config_key`` (the configuration and the data's fingerprint) and its d and seed match;
    the data is loaded (when ``data`` is None) to compute that fingerprint.

    Returns:
      All matching records (reused and new) for the requested dims and seeds.
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
            result = train_and_evaluate(cfg, data, progress=progress)
            result.setdefault("data_fingerprint", fingerprint)
            for rec in seed_records(result, cfg):
                _results.append_jsonl(runs_path, rec)
                have[(key, int(dim), int(rec["seed"]))] = rec
            if progress is not None:
                progress(
                    {
                        "event": "run_end",
                        "dim": int(dim),
                        "val_accuracy": result["val_accuracy"],
                        "wall_time_s": result["wall_time_s"],
                    }
                )
        records.extend(have[(key, int(dim), int(s))] for s in seeds)
    return records


def interpolate_crossing(
    dims: Sequence[float], values: Sequence[float], target: float
) -> float | None:
    """Smallest d where the curve ``values(dims)`` reaches ``target``, interpolated in log d.

    ``dims`` must be increasing. Returns the first grid point if it already reaches the target
    and None if no point does.
    """
    for i, (d, v) in enumerate(zip(dims, values, strict=True)):
        if v >= target:
            if i == 0:
                return float(d)
            d0, v0 = dims[i - 1], values[i - 1]
            frac = (target - v0) / (v - v0) if v != v0 else 1.0
            return float(math.exp(math.log(d0) + frac * (math.log(d) - math.log(d0))))
    return None


def sweep_definition(fraction: float, metric: str = "val_accuracy") -> str:
    return (
        f"d_int{round(fraction * 100)}: the smallest subspace dimension d at which the mean "
        f"{metric.replace('_', ' ')} over seeds (final epoch) reaches {fraction} x the direct "
        f"baseline's mean {metric.replace('_', ' ')} over the same seeds; interpolated linearly "
        "in log(d) between the last grid point below the threshold and the first at or above "
        "it; null if no grid point reaches it."
    )


def summarize_sweep(
    baseline_records: Sequence[dict],
    records: Sequence[dict],
    *,
    fraction: float = 0.9,
    metric: str = "val_accuracy",
) -> dict:
    """d_int (interpolated) and the per-d means from the records of a sweep."""
    baseline = float(np.mean([r[metric] for r in baseline_records]))
    dims = sorted({int(r["dim"]) for r in records if int(r["dim"]) > 0})
    means = [float(np.mean([r[metric] for r in records if int(r["dim"]) == d])) for d in dims]
    target = fraction * baseline
    return {
        "baseline_accuracy": baseline,
        "threshold": target,
        "fraction": fraction,
        "metric": metric,
        "dims": dims,
        "mean_accuracy": means,
        "d_int": interpolate_crossing(dims, means, target),
        "definition": sweep_definition(fraction, metric),
    }


def run_sweep(
    base: TrainConfig,
    dims: Sequence[int],
    out_dir: str | Path,
    *,
    fraction: float = 0.9,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """The full sweep: baseline (d = 0) and every d, for ``base.seeds``; writes the plot.

    Returns:
      ``{"baseline": {...}, "runs": [...], "d_int90": number|None, "definition": str, ...}``;
      ``d_int90`` holds the crossing at ``fraction`` (0.9 unless changed).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 1:
        raise ValueError(f"sweep dims must be integers >= 1, got {dims}")
    out_dir = Path(out_dir)
    seeds = list(base.seeds)
    data = load_data(base)
    baseline_runs = run_dims(base, [0], seeds, out_dir, data=data, progress=progress)
    runs = run_dims(base, dims, seeds, out_dir, data=data, progress=progress)
    summary = summarize_sweep(baseline_runs, runs, fraction=fraction)
    d_int = summary["d_int"]
    plot = _results.plot_accuracy_vs_dim(
        out_dir / "sweep.png",
        runs,
        baseline=summary["baseline_accuracy"],
        fraction=fraction,
        d_int=d_int,
        title=f"{base.model} on {base.dataset}, {base.projection} projection",
    )
    return {
        "baseline": {
            "val_accuracy": summary["baseline_accuracy"],
            "num_params": baseline_runs[0]["num_params"],
            "runs": baseline_runs,
        },
        "runs": runs,
        "d_int90": d_int,
        "fraction": fraction,
        "threshold": summary["threshold"],
        "dims": summary["dims"],
        "mean_accuracy": summary["mean_accuracy"],
        "definition": summary["definition"],
        "config": base.to_dict(),
        "plot": str(plot),
    }
