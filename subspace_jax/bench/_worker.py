"""The benchmark's worker: what one process measures (the direct step, then cells).

Run in this process (``isolate="none"``) or in a fresh one per cell or projection, as
``python -m subspace_jax.bench --one SPEC.json OUT.jsonl`` (one JSON record a line).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import _results, sharding
from subspace_jax._subspace import (
    check_finite,
    init_from_layout,
    init_subspace,
    make_layout,
)
from subspace_jax.bench._plan import STORED_DENSE, Record
from subspace_jax.models import build_model
from subspace_jax.projections import default_learning_rate, get_projection
from subspace_jax.projections._auto import available_memory_bytes
from subspace_jax.train import (
    DIRECT_LR,
    TrainConfig,
    init_train_vars,
    make_optimizer,
    make_train_step,
    split_state,
    train_and_evaluate,
)


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
    """One jitted training step with its state, timed in place (state is donated).

    With a ``mesh`` the step is training's sharded one (:func:`sharding.sharded_train_step`)
    for one seed: the batch split along ``"data"``, the projection state along ``"params"``.
    """

    def __init__(self, model, sub, lr: float, mesh=None):

        opt = make_optimizer("adam", lr)

        def start(sub):
            # Fresh copies (the step donates them), with the model's state (BatchNorm
            # statistics, carried through each timed step as in training), if any.
            trainable = init_train_vars(sub)
            return trainable, opt.init(split_state(trainable)[0])

        step = make_train_step(model.apply, opt)
        if mesh is None:
            self.sub = sub
            self.trainable, self.opt_state = jax.jit(start)(sub)  # one compile, not one per op
            self.step = jax.jit(step, donate_argnums=(1, 2))
        else:
            subs = jax.tree_util.tree_map(lambda a: a[None], sub)  # a seed axis of 1
            trainable, opt_state = jax.jit(jax.vmap(start))(subs)
            self.sub, self.trainable, self.opt_state = sharding.place_state(
                mesh, subs, trainable, opt_state
            )
            self.step = sharding.sharded_train_step(step, mesh)

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
        self.mesh = bench_mesh(spec)
        self.x, self.y = sharding.shard_batch(
            self.mesh,
            jax.device_put(rng.standard_normal((b, *shape), dtype=np.float32)),
            jax.device_put(rng.integers(0, 10, size=(b,), dtype=np.int32)),
        )
        self.warmup, self.steps = int(spec["warmup"]), int(spec["steps"])
        self.bandwidth: float | None = None  # measured once per process, when first needed
        self.direct = _Stepper(
            self.model, init_subspace(k_model, self.theta0, 0), DIRECT_LR, self.mesh
        )
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
            **self.device_fields(),
        }

    def device_fields(self) -> Record:
        """``devices`` and ``mesh`` of the timed steps (as in training's result JSON)."""
        if self.mesh is None:
            return {"devices": 1, "mesh": dict(sharding.SINGLE)}
        return {"devices": int(self.mesh.devices.size), "mesh": sharding.mesh_shape(self.mesh)}

    def cell(self, name: str, d: int) -> Record:

        D = int(self.model.num_params)
        before = self.direct.run(self.x, self.y, self.steps)
        layout = make_layout(self.theta0, d, projection=name)
        init = jax.jit(lambda k, th: init_from_layout(k, th, layout))
        t = time.perf_counter()
        sub = jax.block_until_ready(init(self.k_proj, self.theta0))
        setup_s = time.perf_counter() - t
        check_finite(sub)
        lr = default_learning_rate(sub)
        stepper = _Stepper(self.model, sub, lr, self.mesh)
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
            **self.device_fields(),
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
        res = train_and_evaluate(config, mesh=self.mesh).result
        return {
            "val_accuracy": res["val_accuracy"],
            "accuracy_steps": res["steps"],
            "accuracy_data": res["data_source"],
        }


def bench_mesh(spec: Mapping[str, Any]):
    """The mesh of the timed steps: ``spec["devices"]`` of this process's devices (None: all)
    laid out by ``spec["mesh"]`` (a :class:`~subspace_jax.sharding.MeshSpec` as a dict) for
    one seed; None on one device."""
    plan = sharding.local_plan(spec.get("devices"), sharding.MeshSpec(**(spec.get("mesh") or {})))
    return sharding.resolve_mesh(plan, 1, int(spec["batch_size"]))


def _failure(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    msg = lines[0][:300] if lines else ""
    return f"failed: {type(exc).__name__}: {msg}"


def work_through(spec: Mapping[str, Any], emit: Callable[[Record], None]) -> None:
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


def worker_main(argv: Sequence[str]) -> int:
    """``python -m subspace_jax.bench --one SPEC.json OUT.jsonl``: one isolated run."""
    if len(argv) != 3 or argv[0] != "--one":
        print("usage: python -m subspace_jax.bench --one SPEC.json OUT.jsonl", file=sys.stderr)
        return 2

    spec = json.loads(Path(argv[1]).read_text())
    work_through(spec, lambda rec: _results.append_jsonl(argv[2], rec))
    return 0
