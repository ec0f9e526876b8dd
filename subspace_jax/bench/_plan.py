"""The benchmark's planner: which cells run, which are skipped and why, grouped by process.

Plain Python (no JAX, no projection registry, nothing of the package): what the planner needs
to know of a projection at ``(D, d)`` comes in as a :class:`CellFacts`, so the rules are tested
without JAX and without running anything. The orchestration (:mod:`subspace_jax.bench._run`)
builds the facts from the registry and runs the plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

#: Memory a projection may need while it is drawn and applied, as a multiple of its state.
WORKING_FACTOR = 3
#: Default limit on a cell's estimated run time (setup + warm-up + timed steps), seconds.
DEFAULT_MAX_CELL_SECONDS = 60.0
#: Projections whose state is a stored ``(D, d)`` float32 matrix: they get ``floor_ms``.
STORED_DENSE = ("dense", "dense_unnormalized", "orthogonal")
#: Ways of running the cells: a fresh process per cell, one per projection (its dims in
#: ascending order, so the process peak is the largest d's), or all in this process.
ISOLATION = ("cell", "projection", "none")
#: Record fields every record carries (``None`` where a skipped cell has no value).
CONTRACT_FIELDS = (
    "projection",
    "num_params",
    "dim",
    "step_time_ms",
    "direct_step_time_ms",
    "ratio",
    "peak_memory_bytes",
    "direct_peak_memory_bytes",
    "setup_time_s",
    "model",
    "dataset",
    "batch_size",
    "backend",
)

# Cost model of a cell, used only to skip cells that would take too long (never reported as a
# measurement). Per kind: (step ns per unit, setup seconds fixed, setup ns per unit), where a
# unit is a D*d entry (stored, hash, regen), a stored non-zero slot (sparse: row-sorted
# formats; bcoo: BCOO) or D log2 D (fastfood, hadamard). The CPU numbers are rough fits to
# measurements at D = 472,610 on the 2-core development machine while it was shared with other
# jobs (so they err on the slow side); the GPU numbers are guesses scaled by memory bandwidth.
_COST = {
    "cpu": {
        "stored": (1.5, 5.0, 60.0),
        "hash": (1.5, 3.0, 0.0),
        "regen": (70.0, 3.0, 0.0),
        "sparse": (25.0, 3.0, 1000.0),
        "bcoo": (68.0, 3.0, 200.0),
        "fastfood": (3.0, 5.0, 0.0),
        "hadamard": (16.0, 5.0, 0.0),
    },
    "gpu": {
        "stored": (0.003, 2.0, 0.01),
        "hash": (0.01, 2.0, 0.0),
        "regen": (0.05, 2.0, 0.0),
        "sparse": (0.05, 2.0, 0.5),
        "bcoo": (0.1, 2.0, 0.5),
        "fastfood": (0.05, 2.0, 0.0),
        "hadamard": (0.05, 2.0, 0.0),
    },
}
#: Seconds per flop of the QR that draws ``orthogonal`` (2 D d^2 flops), per backend.
_QR_NS_PER_FLOP = {"cpu": 2.6, "gpu": 0.001}
#: Seconds a cell costs beyond setup and steps (compiling, timing the direct step).
_CELL_OVERHEAD_S = {"cpu": 5.0, "gpu": 2.0}

Record = dict[str, Any]


class Work(NamedTuple):
    """A projection's size in the cost model: ``kind`` ("" if the model does not know it),
    ``units`` of that kind and the ``qr_flops`` of drawing it."""

    kind: str
    units: float
    qr_flops: float = 0.0


class CellFacts(NamedTuple):
    """What the planner needs to know of one projection at ``(D, d)``."""

    max_dim: int  # largest d the projection allows at this D
    state_bytes: int  # bytes of its state
    work: Work  # its size in the cost model


class Limits(NamedTuple):
    """The limits a plan is made under."""

    budget: int  # bytes a cell may use
    max_cell_seconds: float | None  # estimated seconds above which a cell is skipped
    dim_caps: Mapping[str, int]  # largest d per projection
    steps: int
    warmup: int
    backend: str


class Cell(NamedTuple):
    """One ``(projection, d)`` of the grid and, if it does not run, why."""

    projection: str
    dim: int
    skipped: str | None


def work_of(name: str, D: int, d: int, sparse_slots: Callable[[str], float] | None) -> Work:
    """The cost-model size of a projection by name; ``sparse_slots(name)`` (None: not sparse)
    gives a sparse projection's stored non-zeros."""
    entries = float(D) * d
    if name in ("dense", "dense_unnormalized"):
        return Work("stored", entries)
    if name == "orthogonal":
        return Work("stored", entries, 2.0 * D * d * d)
    if name == "dense_hash":
        return Work("hash", entries)
    if name == "dense_regen":
        return Work("regen", entries)
    if name in ("fastfood", "orthogonal_hadamard"):
        kind = "fastfood" if name == "fastfood" else "hadamard"
        return Work(kind, D * math.log2(max(D, 2)))
    if sparse_slots is not None:
        row_sorted = name == "sparse" or name.startswith("sparse_very_")
        return Work("sparse" if row_sorted else "bcoo", sparse_slots(name))
    return Work("", 0.0)


def cell_seconds(
    work: Work, *, steps: int, warmup: int, backend: str = "cpu"
) -> tuple[float, float] | None:
    """Rough ``(seconds per step, seconds for the whole cell)`` of a projection's ``work``, or
    None when the cost model does not know its kind (constants in ``_COST``)."""
    if not work.kind:
        return None
    key = "cpu" if backend == "cpu" else "gpu"
    step_ns, setup_fixed, setup_ns = _COST[key][work.kind]
    step_s = step_ns * work.units * 1e-9
    setup_s = (
        setup_fixed + setup_ns * work.units * 1e-9 + _QR_NS_PER_FLOP[key] * work.qr_flops * 1e-9
    )
    return step_s, _CELL_OVERHEAD_S[key] + setup_s + (warmup + steps) * step_s


def skip_reason(name: str, d: int, D: int, facts: CellFacts, limits: Limits) -> str | None:
    """Why the cell ``(name, d)`` is not run (out of range, capped, too big, too slow), or
    None when it runs."""
    if not 1 <= d <= facts.max_dim:
        return (
            f"d = {d} is out of range for D = {D} with projection {name!r}: "
            f"allowed 1..{facts.max_dim}"
        )
    if name in limits.dim_caps and d > int(limits.dim_caps[name]):
        return f"not run: this grid runs {name!r} only up to d = {int(limits.dim_caps[name])}"
    need = WORKING_FACTOR * int(facts.state_bytes)
    if need > limits.budget:
        return (
            f"does not fit: {WORKING_FACTOR} x state {facts.state_bytes / 2**30:.2f} GiB = "
            f"{need / 2**30:.2f} GiB > budget {limits.budget / 2**30:.2f} GiB"
        )
    est = cell_seconds(facts.work, steps=limits.steps, warmup=limits.warmup, backend=limits.backend)
    if limits.max_cell_seconds is not None and est is not None and est[1] > limits.max_cell_seconds:
        backend = limits.backend.upper() if limits.backend == "cpu" else limits.backend
        return (
            f"too slow on {backend}: estimated {est[0]:.1f}s/step, {est[1]:.0f}s for the cell "
            f"(D*d = {D * d:.3g}; limit {limits.max_cell_seconds:.0f}s)"
        )
    return None


def plan_cells(
    projections: Sequence[str],
    dims: Sequence[int | str],
    D: int,
    facts: Callable[[str, int], CellFacts],
    limits: Limits,
) -> list[Cell]:
    """Every ``(projection, d)`` in the order given (``"full"`` is ``d = D``), each with its
    skip reason (None: it runs)."""
    cells = []
    for name in projections:
        for dd in dims:
            d = D if dd == "full" else int(dd)
            cells.append(Cell(name, d, skip_reason(name, d, D, facts(name, d), limits)))
    return cells


def group_cells(cells: Sequence[Cell], isolate: str) -> list[list[Cell]]:
    """The cells that run, one list per process: one cell each (``"cell"``), or a projection's
    cells by ascending d (``"projection"``, ``"none"``)."""
    groups: list[list[Cell]] = []
    for name in dict.fromkeys(c.projection for c in cells):
        todo = [c for c in cells if c.projection == name and c.skipped is None]
        if isolate == "cell":
            groups.extend([c] for c in todo)
        elif todo:
            groups.append(sorted(todo, key=lambda c: c.dim))
    return groups


def settle(
    remaining: Sequence[Cell], got: Sequence[Record], why: str | None
) -> tuple[list[tuple[Cell, Record]], list[Cell]]:
    """Match what one process returned to the cells it was given.

    Returns:
      ``(done, still)``: each finished cell with its record (the first cell without one is the
      cell the process died in, skipped with ``why``), and the cells after it, to run again.
    """
    by_key = {(r["projection"], int(r["dim"])): r for r in got}
    done: list[tuple[Cell, Record]] = []
    still: list[Cell] = []
    blamed = False
    for cell in remaining:
        r = by_key.get((cell.projection, cell.dim))
        if r is None and not blamed:
            r = {"skipped": why or "the process ended without a result"}
            blamed = True
        elif r is None:
            still.append(cell)
            continue
        done.append((cell, {k: v for k, v in r.items() if k != "kind"}))
    return done, still


def budget_bytes(
    memory_budget_bytes: int | None, direct: Record, host_available: int | None, fraction: float
) -> int:
    """The memory budget of a cell: ``memory_budget_bytes``, else ``fraction`` of the memory
    available (the host's on CPU when known, else what the direct process saw)."""
    if memory_budget_bytes is not None:
        return int(memory_budget_bytes)
    available = direct["available_memory_bytes"]
    if direct["backend"] == "cpu":
        available = host_available or available
    return int(fraction * available)
