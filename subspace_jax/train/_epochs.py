"""The epoch loop: chunks of steps as one jitted ``lax.scan``, the data on the device.

An epoch is split into chunks of ``L`` steps (:func:`chunk_steps`); each chunk is one call of
:func:`~subspace_jax.train.compile_chunk`, so the host dispatches once a chunk, not once a
step, and synchronises once a chunk (to read the chunk's losses and report progress). When the
dataset fits (:func:`place_data`: train, validation and test splits within
``DEVICE_DATA_FRACTION`` of the device's memory, or of the host's on a CPU) it is copied to the
device once and each step's batch is gathered there from the epoch's index permutation;
otherwise the chunk's batches are gathered on the host (the next chunk's while the device runs
the current one) and sent as one array.

On XLA:CPU a model with convolutions is stepped from the host instead
(:func:`~subspace_jax.train.loops_on_host`, :class:`~subspace_jax.train.HostChunk`): a chunk is
then one jitted call a step, with the seeds unrolled, because XLA:CPU runs convolutions inside
a loop or branch about 17x slower and seed-vmapped ones about 4x slower. Results, progress and
checkpoints are the same; only the rounding of fused sums may differ.

The data order is :func:`~subspace_jax.data.iterate_batches`' for every placement: batch ``b``
of epoch ``e`` is ``shuffle_order(N, seed=data_seed, epoch=e)[b * B : (b + 1) * B]``, so a run
gives the per-step loop's numbers.

``step_time_ms`` of a result is the median over chunks of (chunk wall time / steps in the
chunk), the chunk compiled ahead of time so no chunk's time includes compilation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import sharding
from subspace_jax.data import Dataset, num_batches, shuffle_order
from subspace_jax.train._step import HostChunk

Progress = Callable[[dict], None]

#: An epoch is split into about this many chunks (progress is reported once a chunk) ...
CHUNKS_PER_EPOCH = 10
#: ... of at least this many steps (few host round trips on small datasets).
MIN_CHUNK_STEPS = 32
#: The data goes to the device when all its splits take at most this fraction of the device's
#: memory (``bytes_limit``), or of the host's physical memory on a CPU.
DEVICE_DATA_FRACTION = 0.25
#: Examples per evaluation call.
EVAL_CHUNK = 1000


def chunk_steps(steps_per_epoch: int, total_steps: int) -> int:
    """Steps ``L`` per chunk: ``ceil(S / CHUNKS_PER_EPOCH)``, at least ``MIN_CHUNK_STEPS``,
    at most the steps of an epoch (``S``) or of the run."""
    per = -(-steps_per_epoch // CHUNKS_PER_EPOCH)
    return max(1, min(steps_per_epoch, total_steps, max(per, MIN_CHUNK_STEPS)))


def device_data_limit(device: jax.Device | None = None) -> int:
    """Bytes of data :func:`place_data` puts on ``device`` (default: the first device)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return int(DEVICE_DATA_FRACTION * stats["bytes_limit"])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(DEVICE_DATA_FRACTION * total)


class Placed(NamedTuple):
    """The splits where the loop reads them.

    Attributes:
      on_device: True when the splits were copied to the device.
      train: ``(x, y)`` device arrays, or ``()`` when batches are fed from the host.
      val: ``(x, y)``, device arrays or the host's numpy arrays.
      test: ``(x, y)`` likewise.
    """

    on_device: bool
    train: tuple
    val: tuple
    test: tuple


def place_data(data: Dataset, limit: int | None = None) -> Placed:
    """Copy ``data``'s splits to the device when they fit within ``limit`` bytes.

    Args:
      data: the dataset.
      limit: bytes allowed on the device (None: :func:`device_data_limit`).
    """
    arrays = (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test)
    size = sum(int(a.nbytes) for a in arrays)
    if size > (device_data_limit() if limit is None else limit):
        return Placed(False, (), (data.x_val, data.y_val), (data.x_test, data.y_test))
    xt, yt, xv, yv, xs, ys = jax.device_put(arrays)
    return Placed(True, (xt, yt), (xv, yv), (xs, ys))


class LoopState(NamedTuple):
    """Where training stands, after a chunk: what a resumed run needs to go on.

    Attributes:
      trainables: the trainable variables, leading axis = seed (device).
      opt_states: the optimiser states, batched over seeds (device).
      divs: the :class:`~subspace_jax.train.Divergence` records, batched over seeds (device).
      step: steps done in all.
      epoch: the epoch under way (0-based); ``epoch_step`` of its steps are done.
      epoch_step: steps of ``epoch`` done.
      losses: ``(epoch_step, N)`` float training losses of ``epoch``'s steps so far.
      accs: ``(epoch_step, N)`` float training accuracies likewise.
      epoch_time_s: seconds spent in ``epoch`` so far.
      best_val: ``(N,)`` best validation accuracy of the finished epochs.
      epochs: one raw record per finished epoch (see ``_loop._Runs``).
      step_times: seconds per step of each chunk so far.
    """

    trainables: Any
    opt_states: Any
    divs: Any
    step: int
    epoch: int
    epoch_step: int
    losses: np.ndarray
    accs: np.ndarray
    epoch_time_s: float
    best_val: np.ndarray
    epochs: list
    step_times: list


class Loop(NamedTuple):
    """What the epoch loop runs with (fixed for a group of seeds).

    Attributes:
      chunk: the compiled chunk (:func:`~subspace_jax.train.compile_chunk`, ahead of time).
      eval_step: the jitted, seed-vmapped evaluation step.
      subs: the subspaces, batched over seeds.
      placed: the data's placement.
      data: the dataset (host arrays).
      batch_size: examples per step.
      data_seed: seed of the data order.
      epochs: epochs of the run.
      total_steps: steps of the run.
      chunk_len: ``L``, steps per chunk.
      seeds: the seeds trained.
      lr: their learning rate (reported with a divergence).
      mesh: the devices the seeds train on (:mod:`subspace_jax.sharding`), or None: one
        device. On a mesh the batches come from the host, along its ``"data"`` axis.
    """

    chunk: Callable
    eval_step: Callable
    subs: Any
    placed: Placed
    data: Dataset
    batch_size: int
    data_seed: int
    epochs: int
    total_steps: int
    chunk_len: int
    seeds: tuple
    lr: float
    mesh: Any = None


def first_state(trainables, opt_states, divs, n: int) -> LoopState:
    """The state of a run that has taken no step."""
    return LoopState(
        trainables=trainables,
        opt_states=opt_states,
        divs=divs,
        step=0,
        epoch=0,
        epoch_step=0,
        losses=np.zeros((0, n), np.float32),
        accs=np.zeros((0, n), np.float32),
        epoch_time_s=0.0,
        best_val=np.full(n, -np.inf),
        epochs=[],
        step_times=[],
    )


def chunk_inputs(loop: Loop, rows: np.ndarray, valid_steps: int):
    """The scanned inputs of one chunk: ``(rows, valid)`` or the host-gathered batches."""
    L = loop.chunk_len
    padded = np.zeros((L, loop.batch_size), np.int32)
    padded[:valid_steps] = rows
    valid = np.arange(L) < valid_steps
    if loop.placed.on_device:
        return padded, valid
    xs = (loop.data.x_train[padded], loop.data.y_train[padded], valid)
    if loop.mesh is None:
        return xs
    return sharding.shard_chunk(loop.mesh, *xs)  # (L, B, ...): B along "data"


def compile_loop_chunk(chunk_fn, subs, state: LoopState, placed: Placed, data: Dataset, L, B):
    """``chunk_fn`` compiled ahead of time for chunks of ``L`` steps of ``B`` examples."""
    if placed.on_device:
        xs = (jax.ShapeDtypeStruct((L, B), jnp.int32), jax.ShapeDtypeStruct((L,), jnp.bool_))
    else:
        x, y = data.x_train, data.y_train
        xs = (
            jax.ShapeDtypeStruct((L, B, *x.shape[1:]), x.dtype),
            jax.ShapeDtypeStruct((L, B), y.dtype),
            jax.ShapeDtypeStruct((L,), jnp.bool_),
        )
    args = (subs, state.trainables, state.opt_states, state.divs, placed.train, xs)
    if isinstance(chunk_fn, HostChunk):
        return chunk_fn.compile(*args)
    return chunk_fn.lower(*args).compile()


def run_epochs(
    loop: Loop,
    state: LoopState,
    progress: Progress | None = None,
    on_chunk: Callable[[LoopState, bool], None] | None = None,
) -> LoopState:
    """Train from ``state`` to the end of the run; ``on_chunk(state, epoch_ended)`` after each
    chunk but an epoch's last, and once when the epoch's record is complete (before the
    progress events that report them)."""
    while state.epoch < loop.epochs and state.step < loop.total_steps:
        state = train_epoch(loop, state, progress, on_chunk)
    return state


def train_epoch(
    loop: Loop,
    state: LoopState,
    progress: Progress | None = None,
    on_chunk: Callable[[LoopState, bool], None] | None = None,
) -> LoopState:
    """Finish epoch ``state.epoch`` (from step ``state.epoch_step`` of it) and evaluate."""
    n_train = len(loop.data.x_train)
    per_epoch = num_batches(n_train, loop.batch_size, True)
    end = min(per_epoch, state.epoch_step + loop.total_steps - state.step)
    order = shuffle_order(n_train, seed=loop.data_seed, epoch=state.epoch)
    rows = order[: per_epoch * loop.batch_size].reshape(per_epoch, loop.batch_size)
    starts = list(range(state.epoch_step, end, loop.chunk_len))
    t_epoch = time.perf_counter() - state.epoch_time_s

    def inputs(start):
        count = min(loop.chunk_len, end - start)
        return count, chunk_inputs(loop, rows[start : start + count], count)

    nxt = inputs(starts[0]) if starts else None
    for k in range(len(starts)):
        count, xs = nxt
        t = time.perf_counter()
        trainables, opt_states, divs, losses, accs = loop.chunk(
            loop.subs, state.trainables, state.opt_states, state.divs, loop.placed.train, xs
        )
        # The host prepares the next chunk while the device runs this one.
        nxt = inputs(starts[k + 1]) if k + 1 < len(starts) else None
        losses, accs = sharding.fetch((losses, accs))  # the one synchronisation of a chunk
        state = state._replace(
            trainables=trainables,
            opt_states=opt_states,
            divs=divs,
            step=state.step + count,
            epoch_step=state.epoch_step + count,
            losses=np.concatenate([state.losses, losses[:count]]),
            accs=np.concatenate([state.accs, accs[:count]]),
            epoch_time_s=time.perf_counter() - t_epoch,
            step_times=[*state.step_times, (time.perf_counter() - t) / count],
        )
        if on_chunk is not None and state.epoch_step < end:
            on_chunk(state, False)  # before the progress event: what was reported is saved
        if progress is not None:
            progress(
                {
                    "event": "step",
                    "step": state.step,
                    "total_steps": loop.total_steps,
                    "epoch": state.epoch,
                }
            )
    state = _end_epoch(loop, state, time.perf_counter() - t_epoch)
    if on_chunk is not None:
        on_chunk(state, True)
    if progress is not None:
        _report_epoch(loop, state, progress)
    return state


def _end_epoch(loop: Loop, state: LoopState, epoch_time_s: float) -> LoopState:
    """Evaluate on the validation split and record the finished epoch."""
    # The divergence flags are read here, once an epoch.
    diverged_at = np.asarray(sharding.fetch(state.divs.at))
    val_loss, val_acc = evaluate(
        loop.eval_step, loop.subs, state.trainables, *loop.placed.val, mesh=loop.mesh
    )
    raw = {
        "epoch": state.epoch + 1,
        "steps": state.step,
        "train_loss": np.mean(state.losses, axis=0),
        "train_accuracy": np.mean(state.accs, axis=0),
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "diverged_at": diverged_at,
        "epoch_time_s": epoch_time_s,
    }
    n = state.losses.shape[1]
    return state._replace(
        epoch=state.epoch + 1,
        epoch_step=0,
        losses=np.zeros((0, n), np.float32),
        accs=np.zeros((0, n), np.float32),
        epoch_time_s=0.0,
        best_val=np.maximum(state.best_val, val_acc),
        epochs=[*state.epochs, raw],
    )


def _report_epoch(loop: Loop, state: LoopState, progress: Progress) -> None:
    """The ``diverged`` events of the seeds new to diverge, then the ``epoch`` event."""
    raw = state.epochs[-1]
    diverged_at = raw["diverged_at"]
    before = state.epochs[-2]["diverged_at"] if len(state.epochs) > 1 else 0 * diverged_at
    for i in np.flatnonzero((diverged_at > 0) & (before == 0)):
        progress(
            {
                "event": "diverged",
                "seed": int(loop.seeds[i]),
                "step": int(diverged_at[i]),
                "learning_rate": loop.lr,
            }
        )
    # For the logs (subspace_jax._logs): the group's seeds (a retry trains a subset).
    extra = {"seeds": [int(s) for s in loop.seeds], "learning_rate": loop.lr}
    extra["per_seed_train_accuracy"] = [float(a) for a in raw["train_accuracy"]]
    progress({"event": "epoch", **extra, **epoch_record(raw)})


def live_mean(values: np.ndarray, diverged: np.ndarray) -> float | None:
    """The mean over the seeds that did not diverge; None when every seed diverged."""
    live = np.asarray(values)[~diverged]
    return float(np.mean(live)) if live.size else None


def epoch_record(raw: dict) -> dict:
    """One ``history`` entry: means over the seeds not diverged by the epoch's end."""
    diverged = raw["diverged_at"] > 0
    return {
        "epoch": raw["epoch"],
        "steps": raw["steps"],
        "train_loss": live_mean(raw["train_loss"], diverged),
        "train_accuracy": live_mean(raw["train_accuracy"], diverged),
        "val_loss": live_mean(raw["val_loss"], diverged),
        "val_accuracy": live_mean(raw["val_accuracy"], diverged),
        "per_seed_val_accuracy": [float(a) for a in raw["val_accuracy"]],
        "per_seed_val_loss": [float(a) for a in raw["val_loss"]],
        "per_seed_train_loss": [float(a) for a in raw["train_loss"]],
        "per_seed_diverged": [bool(d) for d in diverged],
        "epoch_time_s": raw["epoch_time_s"],
    }


def evaluate(eval_step, subs, trainables, x, y, chunk: int = EVAL_CHUNK, mesh=None):
    """Mean loss and accuracy, ``(N,)`` each, over ``(x, y)`` in chunks of ``chunk`` examples.

    The chunks are dispatched without waiting (device arrays are sliced on the device); the
    host reads the two sums once at the end. With ``mesh``, each chunk is placed along its
    ``"data"`` axis.
    """
    n = len(x)
    loss = 0.0
    correct = 0.0
    for start in range(0, n, chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        if mesh is not None:
            xc, yc = sharding.shard_batch(mesh, xc, yc)
        l_sum, c = eval_step(subs, trainables, xc, yc)
        loss = loss + l_sum
        correct = correct + c.astype(jnp.float32)  # int32 counts, summed as float32
    loss, correct = sharding.fetch((loss, correct))
    return np.asarray(loss) / n, np.asarray(correct) / n
