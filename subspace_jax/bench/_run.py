"""The benchmark's orchestration: validate, measure the direct step, plan, run the cells.

The planning rules are in :mod:`subspace_jax.bench._plan` (no JAX), the measurements in
:mod:`subspace_jax.bench._worker`.
"""

from __future__ import annotations

import json
import numbers
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from subspace_jax import _results
from subspace_jax._errors import UserError
from subspace_jax.bench._plan import (
    CONTRACT_FIELDS,
    DEFAULT_MAX_CELL_SECONDS,
    ISOLATION,
    Cell,
    CellFacts,
    Limits,
    Record,
    Work,
    budget_bytes,
    cell_seconds,
    group_cells,
    plan_cells,
    settle,
    work_of,
)
from subspace_jax.bench._worker import work_through
from subspace_jax.data import DATASETS
from subspace_jax.models import model_names
from subspace_jax.projections import choose_projection, get_projection
from subspace_jax.projections._auto import DEFAULT_BUDGET_FRACTION, _host_available_bytes
from subspace_jax.projections._sparse import SPARSE_VARIANTS, max_nnz_per_column
from subspace_jax.train import input_shape as train_input_shape

Progress = Callable[[Record], None]
#: ``(spec, tag) -> (records, why the process died or None)``: runs one worker.
Runner = Callable[[dict, str], tuple[list[Record], str | None]]


def input_shape(model: str, dataset: str) -> tuple[int, int, int]:
    """The ``(H, W, C)`` input of ``model`` on ``dataset`` (CIFAR-10 at 28x28x3 for MLPs).

    Raises:
      ValueError: for an unknown dataset.
    """
    return train_input_shape(model, dataset)


def _work(name: str, D: int, d: int) -> Work:
    """The cost-model size of projection ``name`` at ``(D, d)``."""
    base = name if name in SPARSE_VARIANTS else "sparse_very" if name.startswith("sparse") else ""
    if not base:
        return work_of(name, D, d, None)
    nnz = max_nnz_per_column(D, SPARSE_VARIANTS[base][0](D, d))
    return work_of(name, D, d, lambda _: float(d) * nnz)


def estimate_cell_seconds(
    name: str, D: int, d: int, *, steps: int, warmup: int, backend: str = "cpu"
) -> tuple[float, float] | None:
    """Rough ``(seconds per step, seconds for the whole cell)`` of a projection, or None.

    The cost is linear in ``D * d`` for dense-like projections (stored, hashed, regenerated),
    in the number of stored non-zeros for sparse ones and in ``D log D`` for the fast
    transforms (constants in ``_plan._COST``, fitted on the development CPU); drawing
    ``orthogonal`` adds its QR. The cell draws P, runs ``warmup + steps`` subspace steps and
    times the direct step. None for projections the model does not know.
    """
    return cell_seconds(_work(name, D, d), steps=steps, warmup=warmup, backend=backend)


def cell_facts(name: str, D: int, d: int) -> CellFacts:
    """What the planner needs of a registered projection at ``(D, d)``."""
    proj = get_projection(name)
    hi = proj.max_dim(D)
    if not 1 <= d <= hi:
        return CellFacts(hi, 0, Work("", 0.0))
    return CellFacts(hi, int(proj.state_bytes(D, d)), _work(name, D, d))


# ------------------------------------------------------------------------------ processes


def _run_isolated(
    spec: Mapping[str, Any], workdir: Path, tag: str, timeout_s: float
) -> tuple[list[Record], str | None]:
    """Run ``spec`` in a fresh Python process; its records and, if it died, why."""

    spec_path = workdir / f"{tag}.json"
    out_path = workdir / f"{tag}.jsonl"
    err_path = workdir / f"{tag}.stderr"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "subspace_jax.bench", "--one", str(spec_path), str(out_path)]
    reason = None
    with open(err_path, "w") as err:
        try:
            proc = subprocess.run(
                cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout_s, check=False
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
            reason = f"timed out after {timeout_s:.0f}s"
    if rc is not None and rc != 0:
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            hint = " (probably out of memory)" if rc == -signal.SIGKILL else ""
            reason = f"process killed by {sig}{hint}"
        else:
            tail = [ln for ln in err_path.read_text().splitlines() if ln.strip()]
            last = tail[-1][:300] if tail else ""
            mem = (
                "out of memory: " if ("MemoryError" in last or "RESOURCE_EXHAUSTED" in last) else ""
            )
            reason = f"process failed (exit {rc}): {mem}{last}"
    return _results.read_jsonl(out_path), reason


def _runner(isolate: str, workdir: Path, timeout_s: float) -> Runner:
    """Run a worker spec in this process (``isolate="none"``) or in a fresh one."""

    def run(spec: dict, tag: str) -> tuple[list[Record], str | None]:
        if isolate == "none":
            out: list[Record] = []
            work_through(spec, out.append)
            return out, None
        return _run_isolated(spec, workdir, tag, timeout_s)

    return run


# ------------------------------------------------------------------------------ orchestration


def _validate(
    model, dataset, dims, projections, steps, batch_size, warmup, isolate, accuracy_steps, data_dir
):
    """Reject bad arguments before anything runs."""
    if model not in model_names():
        raise UserError(f"unknown model {model!r}; choose one of: {', '.join(model_names())}")
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if isinstance(projections, str) or not projections:
        raise UserError(f"projections must be a non-empty list of names, got {projections!r}")
    for name in projections:
        get_projection(name)
    if isinstance(dims, (str, int)) or not dims:
        raise UserError(f"dims must be a non-empty list of integers >= 1 or 'full', got {dims!r}")
    for d in dims:
        ok = d == "full" or (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1)
        if not ok:
            raise UserError(f"each dim must be an integer >= 1 or 'full', got {d!r}")
    for label, v, lo in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("warmup", warmup, 1),
        ("accuracy_steps", accuracy_steps, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"{label} must be an integer >= {lo}, got {v!r}")
    if isolate not in ISOLATION:
        raise UserError(f"isolate must be one of {ISOLATION}, got {isolate!r}")
    if accuracy_steps and data_dir is None and dataset != "digits":
        raise UserError(
            f"accuracy_steps needs real data: give data_dir for {dataset!r} (only 'digits' is "
            "shipped with the package)"
        )
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"data_dir {str(data_dir)!r} is not a directory")


def run_benchmark(
    model: str,
    dataset: str,
    dims: Sequence[int | str],
    projections: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    memory_budget_bytes: int | None = None,
    progress: Progress | None = None,
    warmup: int = 2,
    isolate: str = "cell",
    max_cell_seconds: float | None = DEFAULT_MAX_CELL_SECONDS,
    dim_caps: Mapping[str, int] | None = None,
    accuracy_steps: int = 0,
    model_overrides: Mapping[str, Any] | None = None,
    cell_timeout_s: float = 1800.0,
    devices: int | None = None,
    mesh: Mapping[str, Any] | None = None,
) -> list[Record]:
    """Time the training step of each projection at each d against direct training.

    Args:
      model: model name (``subspace_jax.models.model_names()``).
      dataset: dataset name; sets the input shape (MNIST-like 28x28x1, CIFAR-10 32x32x3 or
        28x28x3 for MLPs). Timing uses synthetic batches of that shape.
      dims: subspace dimensions, integers >= 1 or ``"full"`` (d = D).
      projections: registered projection names.
      steps: timed steps per measurement (median reported).
      batch_size: examples per step.
      data_dir: the dataset's folder, for ``accuracy_steps`` only.
      seed: seed of the model, the projection and the synthetic batch.
      memory_budget_bytes: bytes a cell may use; default ``DEFAULT_BUDGET_FRACTION`` of the
        memory available to the direct process (host MemAvailable, or free device memory).
      progress: called with each finished record.
      warmup: untimed steps (the first compiles) before each timing.
      isolate: ``"cell"`` (a process per cell: isolated peak memory), ``"projection"`` (a
        process per projection, dims ascending) or ``"none"`` (this process; its peak memory
        then includes every earlier cell).
      max_cell_seconds: skip a cell whose estimated run time exceeds this (None: never).
      dim_caps: ``{projection: largest d}``; larger d are skipped (slow or large projections
        that a grid runs at small d only).
      accuracy_steps: if > 0, also train ``accuracy_steps`` steps on the real data and report
        ``val_accuracy`` (and ``direct_val_accuracy``).
      model_overrides: keyword overrides for ``build_model`` (e.g. ``{"width": 8}``).
      cell_timeout_s: a subprocess running longer is stopped and its cells skipped.
      devices: time the steps on this many of the local devices (None: all of them): one
        seed's sharded training step, the batch split along ``"data"``.
      mesh: the layout, a :class:`~subspace_jax.sharding.MeshSpec` as a dict (e.g.
        ``{"params": 2}`` to split the projection state too); None: the batch over every
        device. Records give ``devices`` and ``mesh``.

    Returns:
      One record per ``(projection, d)`` in the order given, each with at least
      :data:`CONTRACT_FIELDS` (None where skipped), ``floor_ms`` for stored dense
      projections, and ``skipped`` with the reason when the cell was not measured.

    Raises:
      UserError: for unknown names or bad sizes (a ``ValueError``).
      RuntimeError: if the direct step itself cannot be measured.
    """
    _validate(
        model,
        dataset,
        dims,
        projections,
        steps,
        batch_size,
        warmup,
        isolate,
        accuracy_steps,
        data_dir,
    )
    if memory_budget_bytes is not None and int(memory_budget_bytes) <= 0:
        raise UserError(f"memory_budget_bytes must be >= 1, got {memory_budget_bytes}")
    spec = {
        "model": model,
        "dataset": dataset,
        "data_dir": None if data_dir is None else str(data_dir),
        "input_shape": list(input_shape(model, dataset)),
        "batch_size": int(batch_size),
        "steps": int(steps),
        "warmup": int(warmup),
        "seed": int(seed),
        "accuracy_steps": int(accuracy_steps),
        "model_overrides": dict(model_overrides or {}),
        "devices": None if devices is None else int(devices),
        "mesh": dict(mesh or {}),
    }
    with tempfile.TemporaryDirectory(prefix="subspace_bench_") as tmp:
        run = _runner(isolate, Path(tmp), cell_timeout_s)
        direct = _measure_direct(run, spec)
        D, backend = int(direct["num_params"]), direct["backend"]
        budget = budget_bytes(
            memory_budget_bytes, direct, _host_available_bytes(), DEFAULT_BUDGET_FRACTION
        )
        limits = Limits(budget, max_cell_seconds, dict(dim_caps or {}), steps, warmup, backend)
        cells = plan_cells(projections, dims, D, lambda n, d: cell_facts(n, D, d), limits)
        records = {
            (c.projection, c.dim): _base_record(spec, direct, c, budget, isolate) for c in cells
        }
        for c in cells:
            if c.skipped is not None:
                records[c.projection, c.dim]["skipped"] = c.skipped
                if progress is not None:
                    progress(records[c.projection, c.dim])
        for i, group in enumerate(group_cells(cells, isolate)):
            _run_group(run, spec, group, records, progress, tag=f"run{i + 1}")
    return [records[c.projection, c.dim] for c in cells]


def _measure_direct(run: Runner, spec: dict) -> Record:
    """The direct step's record (time, peak memory, backend, available memory)."""
    got, why = run({**spec, "direct": True, "cells": []}, "direct")
    if not got:
        raise RuntimeError(f"the direct step could not be measured: {why}")
    return got[0]


def _base_record(spec: dict, direct: Record, cell: Cell, budget: int, isolate: str) -> Record:
    """A cell's record before it runs: the contract fields (None until measured) and what is
    known already (the direct step, the settings, ``auto_choice``)."""
    D = int(direct["num_params"])
    rec: Record = {field: None for field in CONTRACT_FIELDS}
    rec.update(
        projection=cell.projection,
        num_params=D,
        dim=cell.dim,
        direct_step_time_ms=direct["direct_step_time_ms"],
        direct_peak_memory_bytes=direct["direct_peak_memory_bytes"],
        model=spec["model"],
        dataset=spec["dataset"],
        batch_size=spec["batch_size"],
        backend=direct["backend"],
        device=direct.get("device"),
        host=direct.get("host"),
        devices=direct.get("devices"),
        mesh=direct.get("mesh"),
        steps=spec["steps"],
        warmup=spec["warmup"],
        isolation=isolate,
        data="synthetic",
        memory_budget_bytes=budget,
    )
    if 1 <= cell.dim <= D:
        rec["auto_choice"] = choose_projection(D, cell.dim, memory_budget_bytes=budget)
    if spec["accuracy_steps"]:
        rec["direct_val_accuracy"] = direct.get("direct_val_accuracy")
    return rec


def _run_group(
    run: Runner,
    spec: dict,
    group: list[Cell],
    records: dict[tuple[str, int], Record],
    progress: Progress | None,
    tag: str,
) -> None:
    """Run one process's cells; when it dies in a cell, skip that one and run the rest in a
    fresh process."""
    remaining, attempt = group, 0
    while remaining:
        attempt += 1
        cells = [{"projection": c.projection, "dim": c.dim} for c in remaining]
        got, why = run({**spec, "cells": cells}, f"{tag}.{attempt}")
        done, remaining = settle(remaining, got, why)
        for cell, measured in done:
            rec = records[cell.projection, cell.dim]
            rec.update(measured)
            if progress is not None:
                progress(rec)


def plot_benchmark(records: Sequence[Record], path: str | os.PathLike) -> list[Path]:
    """Plot step-time ratio and peak-memory ratio against d, one line per projection.

    Writes ``path`` (step time / direct step time) and ``<stem>_memory<suffix>`` (peak memory /
    direct peak memory), both on log-log axes; skipped cells are left out. Records of several
    models or datasets get one pair of plots each, named ``<stem>_<model>_<dataset><suffix>``
    and ``<stem>_<model>_<dataset>_memory<suffix>`` (``path`` itself is then not written).

    Returns:
      The paths written.
    """

    path = Path(path)
    suffix = path.suffix or ".png"
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    written: list[Path] = []
    for (model, dataset), rows in groups.items():
        stem = path.stem if len(groups) == 1 else f"{path.stem}_{model}_{dataset}"
        measured = [r for r in rows if not r.get("skipped") and r.get("ratio") is not None]

        def series(value: Callable[[Record], float], measured=measured):
            out: dict[str, tuple[list[float], list[float]]] = {}
            for r in sorted(measured, key=lambda r: r["dim"]):
                xs, ys = out.setdefault(r["projection"], ([], []))
                xs.append(r["dim"])
                ys.append(value(r))
            return out

        title = f"{model} on {dataset}, D = {rows[0]['num_params']:,} ({rows[0]['backend']})"
        for name, value, ylabel in (
            ("", lambda r: r["ratio"], "step time / direct step time"),
            (
                "_memory",
                lambda r: r["peak_memory_bytes"] / r["direct_peak_memory_bytes"],
                "peak memory / direct peak memory",
            ),
        ):
            out = path.with_name(f"{stem}{name}{suffix}")
            _results.plot_lines(
                out,
                series(value),
                xlabel="subspace dimension d",
                ylabel=ylabel,
                title=title,
                logx=True,
                logy=True,
            )
            written.append(out)
    return written
