"""Performance benchmark: step time, setup time and peak memory of each projection against the
direct (full-parameter) training step, one ``(projection, d)`` cell at a time.

For every cell the jitted training step (:func:`subspace_jax.train.make_train_step`, Adam) of
the subspace and of direct training are timed in the same process, side by side: ``warmup``
untimed steps, then ``steps`` timed ones, each blocked until its outputs are ready (device
synchronisation). The direct step is timed just before and just after the subspace step and
its time is the median of both blocks, so slow drifts of a shared machine affect both alike;
``ratio = step_time_ms / direct_step_time_ms``.

Peak memory: on CPU, the peak resident set size of a process (``ru_maxrss``) cannot be reset,
so by default every cell runs in a fresh subprocess (``python -m subspace_jax.bench``) and its
peak is reported next to the peak of a process that ran the direct step alone
(``direct_peak_memory_bytes``). On an accelerator it is the allocator's
``peak_bytes_in_use``. The timing batches are synthetic (normal pixels, random labels) of the
dataset's shape, so no dataset enters the memory figures; real data is read only for the
optional accuracy runs (``accuracy_steps``), after the memory is recorded.

A cell is reported with ``"skipped": "<reason>"`` instead of being run when ``d`` is out of
range, when ``WORKING_FACTOR * state_bytes(D, d)`` exceeds the memory budget (default
``DEFAULT_BUDGET_FRACTION`` of the available memory), when its estimated run time exceeds
``max_cell_seconds`` (a cost model in ``D * d``, see :func:`estimate_cell_seconds`), when
``d`` is above the cell's cap in ``dim_caps``, or when its subprocess dies (e.g. killed for
memory) or fails.

Record fields (:data:`CONTRACT_FIELDS` are in every record, ``None`` where skipped):
``projection, num_params (D), dim (d), step_time_ms, direct_step_time_ms, ratio,
peak_memory_bytes, direct_peak_memory_bytes, setup_time_s`` (drawing P with its jit compile,
blocked until ready, as a user waits for it), ``model, dataset, batch_size, backend``; measured
cells add ``compile_time_s`` (the first step), the raw ``step_times_ms`` and
``direct_step_times_ms``, ``memory_kind``, ``state_bytes``; every record carries
``memory_budget_bytes`` and ``auto_choice`` (what ``--projection auto`` picks for this budget).
With ``isolate="projection"`` (meant for GPUs, where a process start costs seconds) a
projection's dims run in one process in ascending order, so a cell's peak is the peak up to
its d.

For stored dense matrices (``dense``, ``dense_unnormalized``, ``orthogonal``) the record adds
the memory-bandwidth floor ``floor_ms = 2 * D * d * 4 bytes / copy bandwidth``: the step reads
P once for ``P w`` and once for ``P^T g``; the copy bandwidth is measured in the same process
(``(read + write bytes) / time`` of a large ``x + 1``).

Example:
  >>> recs = run_benchmark("mlp_small", "digits", [20], ["dense"], steps=3, batch_size=32,
  ...                      isolate="none", model_overrides={"width": 4})  # doctest: +SKIP
  >>> sorted(recs[0])[:3]  # doctest: +SKIP
  ['backend', 'batch_size', 'copy_bandwidth_gbs']
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import _results
from subspace_jax._subspace import (
    check_finite,
    init_from_layout,
    init_subspace,
    init_trainable,
    make_layout,
)
from subspace_jax.data import DATASETS
from subspace_jax.models import build_model, model_names
from subspace_jax.projections import choose_projection, default_learning_rate, get_projection
from subspace_jax.projections._auto import (
    DEFAULT_BUDGET_FRACTION,
    _host_available_bytes,
    available_memory_bytes,
)
from subspace_jax.projections._sparse import SPARSE_VARIANTS, max_nnz_per_column
from subspace_jax.train import (
    DIRECT_LR,
    TrainConfig,
    make_optimizer,
    make_train_step,
    train_and_evaluate,
)
from subspace_jax.train import input_shape as train_input_shape

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
Progress = Callable[[Record], None]


# ------------------------------------------------------------------------------ sizes, costs


def input_shape(model: str, dataset: str) -> tuple[int, int, int]:
    """The ``(H, W, C)`` input of ``model`` on ``dataset`` (CIFAR-10 at 28x28x3 for MLPs).

    Raises:
      ValueError: for an unknown dataset.
    """
    return train_input_shape(model, dataset)


def _work(name: str, D: int, d: int) -> tuple[str, float, float]:
    """``(cost kind, units, QR flops)`` of a projection in the cost model ("" if unknown)."""
    entries = float(D) * d
    if name in ("dense", "dense_unnormalized"):
        return "stored", entries, 0.0
    if name == "orthogonal":
        return "stored", entries, 2.0 * D * d * d
    if name == "dense_hash":
        return "hash", entries, 0.0
    if name == "dense_regen":
        return "regen", entries, 0.0
    if name == "fastfood":
        return "fastfood", D * math.log2(max(D, 2)), 0.0
    if name == "orthogonal_hadamard":
        return "hadamard", D * math.log2(max(D, 2)), 0.0
    base = name if name in SPARSE_VARIANTS else "sparse_very" if name.startswith("sparse") else ""
    if base:
        slots = float(d) * max_nnz_per_column(D, SPARSE_VARIANTS[base][0](D, d))
        row_sorted = name == "sparse" or name.startswith("sparse_very_")
        return ("sparse" if row_sorted else "bcoo"), slots, 0.0
    return "", 0.0, 0.0


def estimate_cell_seconds(
    name: str, D: int, d: int, *, steps: int, warmup: int, backend: str = "cpu"
) -> tuple[float, float] | None:
    """Rough ``(seconds per step, seconds for the whole cell)`` of a projection, or None.

    The cost is linear in ``D * d`` for dense-like projections (stored, hashed, regenerated),
    in the number of stored non-zeros for sparse ones and in ``D log D`` for the fast
    transforms (constants in ``_COST``, fitted on the development CPU); drawing ``orthogonal``
    adds its QR. The cell draws P, runs ``warmup + steps`` subspace steps and times the direct
    step. None for projections the model does not know.
    """
    key = "cpu" if backend == "cpu" else "gpu"
    kind, units, qr_flops = _work(name, D, d)
    if not kind:
        return None
    step_ns, setup_fixed, setup_ns = _COST[key][kind]
    step_s = step_ns * units * 1e-9
    setup_s = setup_fixed + setup_ns * units * 1e-9 + _QR_NS_PER_FLOP[key] * qr_flops * 1e-9
    return step_s, _CELL_OVERHEAD_S[key] + setup_s + (warmup + steps) * step_s


def cpu_model_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("" where that file is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def host_description() -> str:
    """The host's CPU model and core count, e.g. ``"AMD EPYC 9B14, 2 cores"``."""
    name = cpu_model_name()
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _load_average() -> float | None:
    """The host's 1-minute load average (how busy a shared machine was), None if unknown."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------ measurement


def _peak_memory(backend: str) -> tuple[int, str]:
    if backend != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measured copy bandwidth of the default device, bytes/s: ``2 * nbytes / best time``.

    Times the jitted ``x + 1`` of a float32 array of ``nbytes`` (each element read once and
    written once) with the input donated, so the output reuses its buffer and no fresh pages
    are touched; blocked until ready, best of ``repeats`` after one warm-up.
    """

    n = max(1, int(nbytes) // 4)
    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = jax.block_until_ready(f(jnp.zeros((n,), jnp.float32)))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        x = jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t)
    del x
    return 2.0 * n * 4 / best


class _Stepper:
    """One jitted training step with its state, timed in place (state is donated)."""

    def __init__(self, model, sub, lr: float):

        opt = make_optimizer("adam", lr)

        def start(sub):
            # Copies: the trainable state is donated and must not alias theta0.
            trainable = jax.tree_util.tree_map(jnp.copy, init_trainable(sub))
            return trainable, opt.init(trainable)

        self.sub = sub
        self.trainable, self.opt_state = jax.jit(start)(sub)  # one compile, not one per op
        self.step = jax.jit(make_train_step(model.apply, opt), donate_argnums=(1, 2))

    def run(self, x, y, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.trainable, self.opt_state, loss, _ = self.step(
                self.sub, self.trainable, self.opt_state, x, y
            )
            jax.block_until_ready((self.trainable, loss))
            times.append(time.perf_counter() - t)
        return times


def _median_ms(seconds: Sequence[float]) -> float:
    return float(np.median(seconds) * 1e3)


class _Worker:
    """What one process measures: the direct step once, then any number of cells."""

    def __init__(self, spec: Mapping[str, Any]):

        self.spec = spec
        self.backend = jax.default_backend()
        shape = tuple(spec["input_shape"])
        self.model = build_model(spec["model"], shape, 10, **dict(spec.get("model_overrides", {})))
        # The training loop's key rule, so the cell's P is the one ``train`` would draw.
        k_model, self.k_proj = jax.random.split(jax.random.key(int(spec["seed"])))
        self.theta0 = jax.jit(self.model.init)(k_model)
        b = int(spec["batch_size"])
        rng = np.random.default_rng(int(spec["seed"]))
        self.x = jax.device_put(rng.standard_normal((b, *shape), dtype=np.float32))
        self.y = jax.device_put(rng.integers(0, 10, size=(b,), dtype=np.int32))
        self.warmup, self.steps = int(spec["warmup"]), int(spec["steps"])
        self.bandwidth: float | None = None  # measured once per process, when first needed
        self.direct = _Stepper(self.model, init_subspace(k_model, self.theta0, 0), DIRECT_LR)
        self.direct.run(self.x, self.y, self.warmup)  # compiles

    def direct_record(self) -> Record:
        times = self.direct.run(self.x, self.y, self.steps)
        peak, kind = _peak_memory(self.backend)

        return {
            "kind": "direct",
            "num_params": int(self.model.num_params),
            "direct_step_time_ms": _median_ms(times),
            "direct_peak_memory_bytes": peak,
            "memory_kind": kind,
            "available_memory_bytes": int(available_memory_bytes()),
            "backend": self.backend,
            "device": str(jax.devices()[0].device_kind),
            "host": host_description(),
        }

    def cell(self, name: str, d: int) -> Record:

        D = int(self.model.num_params)
        before = self.direct.run(self.x, self.y, self.steps)
        layout = make_layout(self.theta0, d, projection=name)
        init = jax.jit(lambda k, th: init_from_layout(k, th, layout))
        t = time.perf_counter()
        sub = jax.block_until_ready(init(self.k_proj, self.theta0))
        setup_s = time.perf_counter() - t
        check_finite(sub)
        lr = default_learning_rate(get_projection(name), D, d)
        stepper = _Stepper(self.model, sub, lr)
        t = time.perf_counter()
        stepper.run(self.x, self.y, 1)
        compile_s = time.perf_counter() - t
        stepper.run(self.x, self.y, max(0, self.warmup - 1))
        times = stepper.run(self.x, self.y, self.steps)
        peak, kind = _peak_memory(self.backend)
        after = self.direct.run(self.x, self.y, self.steps)
        del stepper, sub
        step_ms = _median_ms(times)
        direct_ms = _median_ms(before + after)
        rec: Record = {
            "kind": "cell",
            "projection": name,
            "num_params": D,
            "dim": int(d),
            "step_time_ms": step_ms,
            "direct_step_time_ms": direct_ms,
            "ratio": step_ms / direct_ms,
            "peak_memory_bytes": peak,
            "memory_kind": kind,
            "setup_time_s": setup_s,
            "compile_time_s": compile_s,
            "step_times_ms": [s * 1e3 for s in times],
            "direct_step_times_ms": [s * 1e3 for s in before + after],
            "state_bytes": int(get_projection(name).state_bytes(D, d)),
            "backend": self.backend,
            "load_average": _load_average(),
        }
        if name in STORED_DENSE:
            if self.bandwidth is None:
                self.bandwidth = copy_bandwidth(256 << 20 if self.backend == "cpu" else 1 << 30)
            bw = self.bandwidth
            floor_ms = 2.0 * D * d * 4 / bw * 1e3
            rec.update(
                copy_bandwidth_gbs=bw / 1e9,
                floor_ms=floor_ms,
                floor_ratio=step_ms / floor_ms,
            )
        if int(self.spec.get("accuracy_steps", 0)) > 0:
            rec.update(self.accuracy(name, d))
        return rec

    def accuracy(self, name: str, d: int) -> Record:

        spec = self.spec
        config = TrainConfig(
            model=spec["model"],
            dataset=spec["dataset"],
            data_dir=spec.get("data_dir"),
            dim=int(d),
            projection=name if d else "dense",
            epochs=10**6,
            max_steps=int(spec["accuracy_steps"]),
            batch_size=int(spec["batch_size"]),
            seeds=(int(spec["seed"]),),
            model_overrides=dict(spec.get("model_overrides", {})),
        )
        res = train_and_evaluate(config).result
        return {
            "val_accuracy": res["val_accuracy"],
            "accuracy_steps": res["steps"],
            "accuracy_data": res["data_source"],
        }


def _failure(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    msg = lines[0][:300] if lines else ""
    return f"failed: {type(exc).__name__}: {msg}"


def _work_through(spec: Mapping[str, Any], emit: Callable[[Record], None]) -> None:
    """Measure the direct step (if asked) and every cell of ``spec``, emitting records."""
    worker = _Worker(spec)
    if spec.get("direct"):
        rec = worker.direct_record()
        if int(spec.get("accuracy_steps", 0)) > 0:
            rec.update({f"direct_{k}": v for k, v in worker.accuracy("dense", 0).items()})
        emit(rec)
    for cell in spec.get("cells", ()):
        name, d = cell["projection"], int(cell["dim"])
        try:
            rec = worker.cell(name, d)
        except Exception as exc:  # a cell that fails (e.g. out of memory) is reported
            rec = {"kind": "cell", "projection": name, "dim": d, "skipped": _failure(exc)}
        emit(rec)


def _worker_main(argv: Sequence[str]) -> int:
    """``python -m subspace_jax.bench --one SPEC.json OUT.jsonl``: one isolated run."""
    if len(argv) != 3 or argv[0] != "--one":
        print("usage: python -m subspace_jax.bench --one SPEC.json OUT.jsonl", file=sys.stderr)
        return 2

    spec = json.loads(Path(argv[1]).read_text())
    _work_through(spec, lambda rec: _results.append_jsonl(argv[2], rec))
    return 0


# ------------------------------------------------------------------------------ orchestration


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


def _validate(
    model, dataset, dims, projections, steps, batch_size, warmup, isolate, accuracy_steps, data_dir
):

    if model not in model_names():
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(model_names())}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if isinstance(projections, str) or not projections:
        raise ValueError(f"projections must be a non-empty list of names, got {projections!r}")
    for name in projections:
        get_projection(name)
    if isinstance(dims, (str, int)) or not dims:
        raise ValueError(f"dims must be a non-empty list of integers >= 1 or 'full', got {dims!r}")
    for d in dims:
        ok = d == "full" or (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1)
        if not ok:
            raise ValueError(f"each dim must be an integer >= 1 or 'full', got {d!r}")
    for label, v, lo in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("warmup", warmup, 1),
        ("accuracy_steps", accuracy_steps, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{label} must be an integer >= {lo}, got {v!r}")
    if isolate not in ISOLATION:
        raise ValueError(f"isolate must be one of {ISOLATION}, got {isolate!r}")
    if accuracy_steps and data_dir is None and dataset != "digits":
        raise ValueError(
            f"accuracy_steps needs real data: give data_dir for {dataset!r} (only 'digits' is "
            "shipped with the package)"
        )
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ValueError(f"data_dir {str(data_dir)!r} is not a directory")


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

    Returns:
      One record per ``(projection, d)`` in the order given, each with at least
      :data:`CONTRACT_FIELDS` (None where skipped), ``floor_ms`` for stored dense
      projections, and ``skipped`` with the reason when the cell was not measured.

    Raises:
      ValueError: for unknown names or bad sizes.
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

    shape = input_shape(model, dataset)
    spec = {
        "model": model,
        "dataset": dataset,
        "data_dir": None if data_dir is None else str(data_dir),
        "input_shape": list(shape),
        "batch_size": int(batch_size),
        "steps": int(steps),
        "warmup": int(warmup),
        "seed": int(seed),
        "accuracy_steps": int(accuracy_steps),
        "model_overrides": dict(model_overrides or {}),
    }
    dim_caps = dict(dim_caps or {})
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="subspace_bench_") as tmp:
        workdir = Path(tmp)

        def run(sub_spec: dict, tag: str) -> tuple[list[Record], str | None]:
            if isolate == "none":
                out: list[Record] = []
                _work_through(sub_spec, out.append)
                return out, None
            return _run_isolated(sub_spec, workdir, tag, cell_timeout_s)

        got, why = run({**spec, "direct": True, "cells": []}, "direct")
        if not got:
            raise RuntimeError(f"the direct step could not be measured: {why}")
        direct = got[0]
        D = int(direct["num_params"])
        backend = direct["backend"]
        if memory_budget_bytes is None:
            available = direct["available_memory_bytes"]
            if backend == "cpu":
                available = _host_available_bytes() or available
            budget = int(DEFAULT_BUDGET_FRACTION * available)
        else:
            budget = int(memory_budget_bytes)
            if budget <= 0:
                raise ValueError(f"memory_budget_bytes must be >= 1, got {memory_budget_bytes}")

        def base(name: str, d: int) -> Record:
            rec: Record = {field: None for field in CONTRACT_FIELDS}
            rec.update(
                projection=name,
                num_params=D,
                dim=d,
                direct_step_time_ms=direct["direct_step_time_ms"],
                direct_peak_memory_bytes=direct["direct_peak_memory_bytes"],
                model=model,
                dataset=dataset,
                batch_size=int(batch_size),
                backend=backend,
                device=direct.get("device"),
                host=direct.get("host"),
                steps=int(steps),
                warmup=int(warmup),
                isolation=isolate,
                data="synthetic",
                memory_budget_bytes=budget,
            )
            if 1 <= d <= D:
                rec["auto_choice"] = choose_projection(D, d, memory_budget_bytes=budget)
            if accuracy_steps:
                rec["direct_val_accuracy"] = direct.get("direct_val_accuracy")
            return rec

        plan: list[tuple[str, int, Record]] = []
        for name in projections:
            proj = get_projection(name)
            for dd in dims:
                d = D if dd == "full" else int(dd)
                rec = base(name, d)
                plan.append((name, d, rec))
                hi = proj.max_dim(D)
                if not 1 <= d <= hi:
                    rec["skipped"] = (
                        f"d = {d} is out of range for D = {D} with projection {name!r}: "
                        f"allowed 1..{hi}"
                    )
                    continue
                if name in dim_caps and d > int(dim_caps[name]):
                    rec["skipped"] = (
                        f"not run: this grid runs {name!r} only up to d = {int(dim_caps[name])}"
                    )
                    continue
                need = WORKING_FACTOR * int(proj.state_bytes(D, d))
                if need > budget:
                    rec["skipped"] = (
                        f"does not fit: {WORKING_FACTOR} x state "
                        f"{proj.state_bytes(D, d) / 2**30:.2f} GiB = {need / 2**30:.2f} GiB "
                        f"> budget {budget / 2**30:.2f} GiB"
                    )
                    continue
                est = estimate_cell_seconds(name, D, d, steps=steps, warmup=warmup, backend=backend)
                if max_cell_seconds is not None and est is not None and est[1] > max_cell_seconds:
                    rec["skipped"] = (
                        f"too slow on {backend.upper() if backend == 'cpu' else backend}: "
                        f"estimated {est[0]:.1f}s/step, {est[1]:.0f}s for the cell "
                        f"(D*d = {D * d:.3g}; limit {max_cell_seconds:.0f}s)"
                    )

        for _, _, rec in plan:
            if "skipped" in rec and progress is not None:
                progress(rec)
        # The cells that run, grouped by process.
        groups: list[list[tuple[str, int, Record]]] = []
        for name in projections:
            todo = [c for c in plan if c[0] == name and "skipped" not in c[2]]
            if isolate == "cell":
                groups.extend([c] for c in todo)
            elif todo:
                groups.append(sorted(todo, key=lambda c: c[1]))
        runs = 0
        for group in groups:
            remaining = group
            while remaining:
                runs += 1
                cells = [{"projection": n, "dim": d} for n, d, _ in remaining]
                got, why = run({**spec, "cells": cells}, f"run{runs}")
                by_key = {(r["projection"], int(r["dim"])): r for r in got}
                still = []
                blamed = False
                for n, d, rec in remaining:
                    r = by_key.get((n, d))
                    if r is None and not blamed:
                        # The first cell without a result is the one the process died in.
                        r = {"skipped": why or "the process ended without a result"}
                        blamed = True
                    elif r is None:
                        still.append((n, d, rec))
                        continue
                    rec.update({k: v for k, v in r.items() if k != "kind"})
                    if progress is not None:
                        progress(rec)
                remaining = still
        records = [rec for _, _, rec in plan]
    return records


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


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
