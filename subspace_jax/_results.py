"""Writing results: atomic JSON, append-only JSON lines, and the PNG plots.

Public under the name :mod:`subspace_jax.results` (for experiments/ and benchmarks/). One small
module writes every file, so the commands never lose results: JSON and plots are written to a
temporary file in the destination's folder, flushed to disk and renamed over the destination
(:func:`atomic_write`), so a reader sees the old file or the new one, never a half-written one;
each finished run is appended to a ``.jsonl`` file at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Sequence
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


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it to ``path``.

    The temporary file (``.NAME.<random>.tmp`` in the same folder, so the rename is atomic) is
    created with mode ``0o666`` less the umask, as ``open`` would (0644 under the usual umask
    022); if ``path`` already exists its permission bits are kept. If the body raises, or the
    rename fails (``path`` is a directory, say), the temporary file is removed and ``path`` is
    left as it was. The parent folder must exist.

    Args:
      path: the destination.
      mode: a writing mode of :func:`open` (``"w"``, ``"wb"``, ``"w+b"``, ...).
      **open_kwargs: passed to :func:`open` (``newline=""`` for CSV, ...).

    Yields:
      The open temporary file.

    Example:
      >>> with atomic_write("out.json") as f:
      ...     f.write("{}\n")
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist"
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if "+" in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (:func:`atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        json.dump(_clean(obj), f, indent=2)
        f.write("\n")
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a torn last line (bytes after the last newline, an interrupted append) off a file.

    A record counts only once its line ends in a newline (:func:`append_jsonl` writes the
    record and its newline in one call), so the bytes after the last newline are what a killed
    writer left half-written; they are reported on stderr and removed, so the next append
    starts on a line of its own.

    Returns:
      The number of bytes removed (0 when the file is missing or ends in a newline).
    """
    path = Path(path)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        pos = size
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        if keep == size:
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    print(
        f"warning: {path}: removed a torn last line ({size - keep} bytes without a newline, "
        "left by an interrupted write); that run will be trained again",
        file=sys.stderr,
    )
    return size - keep


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a JSON line and flush it to disk.

    A torn last line left by an interrupted writer is removed first (:func:`repair_jsonl`);
    the record and its newline go to the file in one write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(path)
    line = (json.dumps(_clean(record)) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete record of a JSON-lines file.

    Only lines that end in a newline are records: a torn last line (an interrupted append) is
    never trusted, and a line that is not a JSON object is skipped with a warning on stderr.
    """
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # The last element is what follows the last newline: empty, or a torn line.
    for number, line in enumerate(lines[:-1], start=1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            print(f"warning: {path}: line {number} is not a JSON record; skipped", file=sys.stderr)
            continue
        out.append(record)
    return out


def _save_figure(fig, path: str | os.PathLike) -> None:
    """``fig.savefig`` through :func:`atomic_write` (the format from the suffix, PNG if none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png")


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
    _save_figure(fig, path)
    plt.close(fig)
    return Path(path)


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
    _save_figure(fig, path)
    plt.close(fig)
    return Path(path)
