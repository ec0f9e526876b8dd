"""Writing results: atomic JSON, append-only JSON lines, and the PNG plots.

Public under the name :mod:`subspace_jax.results` (for experiments/ and benchmarks/). One small
module writes every file, so the commands never lose results: JSON is written to a
temporary file and renamed, and each finished run is appended to a ``.jsonl`` file at once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _clean(obj: Any) -> Any:
    """Make ``obj`` strict-JSON: NaN/inf become None, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_clean(obj), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a JSON line and flush it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(_clean(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete record of a JSON-lines file (a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _pyplot():
    """pyplot with the file-only Agg backend.

    Imported here, on the first plot, not at module level: the backend must be chosen before
    pyplot is imported, and commands that draw nothing skip matplotlib's import time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_dim(
    path: str | os.PathLike,
    runs: Sequence[dict],
    *,
    baseline: float | None,
    fraction: float = 0.9,
    d_int: float | None = None,
    metric: str = "val_accuracy",
    title: str = "",
    ci: tuple[float, float] | None = None,
) -> Path:
    """Accuracy vs d (log x axis): each seed as a dot, the mean as a line, the baseline solid
    and ``fraction * baseline`` dotted, as in Li et al. 2018 Figs. 1-4 and the seed report."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    dims = sorted({int(r["dim"]) for r in runs if int(r["dim"]) > 0})
    if dims:
        # A non-finite value (JSON null once stored) is drawn as a gap.
        per_dim = [
            [np.nan if r[metric] is None else r[metric] for r in runs if int(r["dim"]) == dd]
            for dd in dims
        ]
        for dd, vals in zip(dims, per_dim, strict=True):
            ax.scatter([dd] * len(vals), vals, s=12, color="tab:blue", alpha=0.5)
        ax.plot(
            dims,
            [float(np.mean(v)) for v in per_dim],
            "-o",
            color="tab:blue",
            ms=4,
            label="subspace (mean over seeds)",
        )
        ax.set_xscale("log")
    if baseline is not None:
        ax.axhline(baseline, color="k", lw=1, label=f"direct baseline {baseline:.4f}")
        ax.axhline(
            fraction * baseline, color="k", ls=":", lw=1.5, label=f"{fraction:.0%} of baseline"
        )
    if d_int is not None:
        label = f"d_int = {d_int:.0f}"
        if ci is not None and None not in ci:
            ax.axvspan(ci[0], ci[1], color="tab:red", alpha=0.15)
            label += f" [{ci[0]:.0f}, {ci[1]:.0f}]"
        ax.axvline(d_int, color="tab:red", ls="--", lw=1, label=label)
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lines(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """One line per named ``(x, y)`` series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), "-o", ms=3, label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
