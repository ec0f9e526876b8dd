"""Resumable training: the loop's state checkpointed with orbax, and resumed from the latest.

A run (one :class:`~subspace_jax.train.TrainConfig` on one dataset) checkpoints under
``CheckpointOptions.directory / <run key>``: the key hashes the config (every field but
``data_dir``), the data's fingerprint and a ``theta0_path`` file's bytes, so a checkpoint of
another config or other data is never resumed. Each group of seeds trained together has its
own orbax ``CheckpointManager`` folder, ``group-<k>`` (``k = 0`` the first training, ``k >= 1``
the k-th ``on_divergence="retry"`` round), whose numbered step folders hold:

* ``state``: the trainable variables, optimiser states and divergence records (batched over
  seeds), the current epoch's per-step training losses and accuracies, the best validation
  accuracy and the finished epochs' per-seed records (numpy arrays, dtypes kept);
* ``meta``: JSON: the key, ``step``, ``epoch``, ``epoch_step`` (the data-order position: the
  order of an epoch is a function of ``(data_seed, epoch)``), the epochs' step counts and
  times, and the chunk times.

Nothing is random after initialisation (the data order is recomputed from the position), and
the subspaces are not stored: they are drawn again from the seeds (burn-in and lottery phases
run again; they are deterministic). A resumed run therefore ends with exactly the numbers of an
uninterrupted one. orbax writes each checkpoint to a temporary folder and renames it when
complete, so a run killed while saving resumes from the previous one.

Several processes (``jax.distributed``) checkpoint one run together, orbax's multi-host
way: every process calls save and restore in the same order on the same folder (a
filesystem they share), the state is gathered to every host first and process 0 alone writes
it and the metadata, and orbax's barriers make a checkpoint complete only once every process
has reached it. :func:`remove_checkpoints` waits for every process and then lets process 0
delete the folder.

orbax is an optional dependency (the ``checkpoint`` extra): without it :func:`available` is
False and callers turn checkpointing off (saying so when it was asked for).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from subspace_jax import sharding
from subspace_jax.data import Dataset, data_fingerprint
from subspace_jax.train._epochs import LoopState


def _orbax():
    """``orbax.checkpoint``, imported when first needed (it is slow to import and optional)."""
    import orbax.checkpoint as ocp

    return ocp


#: The message of a checkpoint request without orbax.
ORBAX_MISSING = (
    "checkpointing is off: orbax-checkpoint is not installed "
    "(pip install 'subspace-jax[checkpoint]')"
)
#: The per-seed arrays of an epoch record (as in ``_loop._PER_SEED_EPOCH``).
_EPOCH_ARRAYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "diverged_at")


def available() -> bool:
    """True when orbax-checkpoint is installed (the ``checkpoint`` extra)."""
    try:
        return importlib.util.find_spec("orbax.checkpoint") is not None
    except ModuleNotFoundError:  # no ``orbax`` package at all
        return False


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """Where and how often a run checkpoints.

    Attributes:
      directory: the root folder; each run checkpoints in a sub-folder named by its key.
      every_steps: also checkpoint at the first chunk end at least this many steps after the
        previous checkpoint (None: only at epoch ends).
      every_minutes: likewise after this many minutes (None: no time trigger).
      max_to_keep: checkpoints kept per group of seeds (the oldest are deleted).
      keep: :func:`remove_checkpoints` leaves the checkpoints in place.
    """

    directory: str | Path
    every_steps: int | None = None
    every_minutes: float | None = None
    max_to_keep: int = 2
    keep: bool = False


def run_key(config, data: Dataset | str) -> str:
    """16 hex digits naming a run's checkpoints: the config (without ``data_dir``), the data's
    fingerprint (``data`` or its fingerprint) and the bytes of ``config.theta0_path``."""
    d = config.to_dict()
    d.pop("data_dir", None)
    d["data_fingerprint"] = data if isinstance(data, str) else data_fingerprint(data)
    if config.theta0_path is not None:
        d["theta0_sha256"] = hashlib.sha256(Path(config.theta0_path).read_bytes()).hexdigest()
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_directory(options: CheckpointOptions, config, data: Dataset | str) -> Path:
    """The folder of a run's checkpoints: ``options.directory / run_key(config, data)``."""
    return Path(options.directory) / run_key(config, data)


def remove_checkpoints(
    options: CheckpointOptions, config, data: Dataset | str, *, keep: bool = False
) -> None:
    """Delete a run's checkpoints (``data``: the dataset or its fingerprint), and the root
    folder when nothing else is left in it; nothing when ``options.keep`` or ``keep`` (e.g.
    the result could not be written where asked).

    With several processes every process must call this (it is a barrier) and process 0
    alone deletes, so no process is still reading the folder.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("subspace-jax: a run's checkpoints are done")
        if jax.process_index() != 0:
            return
    if options.keep or keep:
        return
    shutil.rmtree(run_directory(options, config, data), ignore_errors=True)
    root = Path(options.directory)
    try:
        root.rmdir()  # only when empty
    except OSError:
        pass


def _host(tree):
    """``tree`` as numpy arrays on this host, gathered when spread over several processes."""
    return jax.tree_util.tree_map(np.asarray, sharding.fetch(tree))


def _pack(tree) -> dict[str, np.ndarray]:
    """The non-empty leaves of ``tree`` on the host, by flat index (orbax refuses empty
    arrays, e.g. the ``(N, 0)`` ``w`` of direct training)."""
    leaves = jax.tree_util.tree_leaves(_host(tree))
    return {str(i): leaf for i, leaf in enumerate(leaves) if leaf.size}


def _unpack(packed: dict, like):
    """``like``'s tree with the leaves of ``packed`` (empty leaves taken from ``like``)."""
    leaves, treedef = jax.tree_util.tree_flatten(_host(like))
    out = [np.asarray(packed.get(str(i), leaf)) for i, leaf in enumerate(leaves)]
    return jax.device_put(jax.tree_util.tree_unflatten(treedef, out))


class GroupCheckpointer:
    """Saves one group of seeds' :class:`LoopState` and restores the latest.

    Used as the epoch loop's ``on_chunk(state, epoch_ended)`` hook: it saves at every epoch
    end and, between, when ``every_steps`` or ``every_minutes`` say so. The orbax manager is
    created on the first save or restore, so a run that fails before training leaves no folder.
    """

    def __init__(self, directory: Path, options: CheckpointOptions, key: str, per_epoch: int):
        self.directory = Path(directory)
        self.options = options
        self.key = key
        self.per_epoch = per_epoch
        self._manager = None
        self._last_step = 0
        self._last_time = time.monotonic()

    def _open(self, create: bool):
        if self._manager is None and (create or self.directory.is_dir()):
            ocp = _orbax()
            opts = ocp.CheckpointManagerOptions(max_to_keep=self.options.max_to_keep, create=True)
            self._manager = ocp.CheckpointManager(
                self.directory.resolve(), options=opts, item_names=("state", "meta")
            )
        return self._manager

    def __call__(self, state: LoopState, epoch_ended: bool) -> None:
        every, minutes = self.options.every_steps, self.options.every_minutes
        if (
            epoch_ended
            or (every is not None and state.step - self._last_step >= every)
            or (minutes is not None and time.monotonic() - self._last_time >= 60 * minutes)
        ):
            self.save(state)

    def save(self, state: LoopState) -> None:
        """Write ``state`` as the checkpoint of its step (asynchronously)."""
        n = state.best_val.shape[0]
        losses = np.zeros((self.per_epoch, n), state.losses.dtype)
        accs = np.zeros((self.per_epoch, n), state.accs.dtype)
        losses[: state.epoch_step] = state.losses
        accs[: state.epoch_step] = state.accs
        tree: dict[str, Any] = {
            "trainables": _pack(state.trainables),
            "opt_states": _pack(state.opt_states),
            "divs": _pack(state.divs),
            "losses": losses,
            "accs": accs,
            "best_val": np.asarray(state.best_val),
        }
        if state.epochs:
            tree["epochs"] = {
                k: np.stack([e[k] for e in state.epochs]).astype(state.epochs[0][k].dtype)
                for k in _EPOCH_ARRAYS
            }
        meta = {
            "key": self.key,
            "step": state.step,
            "epoch": state.epoch,
            "epoch_step": state.epoch_step,
            "epoch_time_s": state.epoch_time_s,
            "step_times": list(state.step_times),
            "epochs": [
                {"epoch": e["epoch"], "steps": e["steps"], "epoch_time_s": e["epoch_time_s"]}
                for e in state.epochs
            ],
            "epoch_dtypes": {k: str(state.epochs[0][k].dtype) for k in _EPOCH_ARRAYS}
            if state.epochs
            else {},
        }
        manager = self._open(create=True)
        ocp = _orbax()
        # A chunk's state is saved once: a second save of the same step (an epoch end right
        # after a step-triggered save) replaces nothing.
        if manager.latest_step() == state.step:
            return
        manager.save(
            state.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._last_step = state.step
        self._last_time = time.monotonic()

    def restore(self, fresh: LoopState) -> LoopState:
        """The latest complete checkpoint of this group as a :class:`LoopState` (``fresh``, the
        state of a run that has taken no step, when there is none or it is another run's)."""
        manager = self._open(create=False)
        step = manager.latest_step() if manager is not None else None
        if step is None:
            return fresh
        ocp = _orbax()
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta.get("key") != self.key:
            return fresh
        n = fresh.best_val.shape[0]
        target: dict[str, Any] = {
            "trainables": _pack(fresh.trainables),
            "opt_states": _pack(fresh.opt_states),
            "divs": _pack(fresh.divs),
            "losses": np.zeros((self.per_epoch, n), fresh.losses.dtype),
            "accs": np.zeros((self.per_epoch, n), fresh.accs.dtype),
            "best_val": np.asarray(fresh.best_val),
        }
        if meta["epochs"]:
            target["epochs"] = {
                k: np.zeros((len(meta["epochs"]), n), np.dtype(dt))
                for k, dt in meta["epoch_dtypes"].items()
            }
        tree = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        ).state
        epochs = [
            {**e, **{k: np.asarray(tree["epochs"][k][i]) for k in _EPOCH_ARRAYS}}
            for i, e in enumerate(meta["epochs"])
        ]
        self._last_step = int(meta["step"])
        k = int(meta["epoch_step"])
        return fresh._replace(
            trainables=_unpack(tree["trainables"], fresh.trainables),
            opt_states=_unpack(tree["opt_states"], fresh.opt_states),
            divs=_unpack(tree["divs"], fresh.divs),
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            epoch_step=k,
            losses=np.asarray(tree["losses"][:k]),
            accs=np.asarray(tree["accs"][:k]),
            epoch_time_s=float(meta["epoch_time_s"]),
            best_val=np.asarray(tree["best_val"]),
            epochs=epochs,
            step_times=list(meta["step_times"]),
        )

    def close(self) -> None:
        """Wait for the last save to be complete."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None
