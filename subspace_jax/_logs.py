"""Live metric logs of training runs: TensorBoard event files and Weights & Biases.

Both are consumers of the training loop's progress events (see
:func:`subspace_jax.train.train_and_evaluate`), so the loop knows nothing of them. One
training of ``N`` seeds at one ``d`` is logged as ``N + 1`` runs named ``d=<d>/seed=<s>``
(that seed's numbers) and ``d=<d>/mean`` (the means over the seeds that did not diverge, and
what the seeds share: step time, memory, d). A seed trained again after diverging
(``--on-divergence retry``) gets its own run ``d=<d>/seed=<s>/retry=<k>``, as its steps start
over. The x axis is the training step of the run (``history[i]["steps"]``).

Scalars (``TAGS``), written at each epoch's last step:

* per seed and mean: ``train/loss``, ``train/accuracy`` (per seed when the epoch event
  carries ``per_seed_train_accuracy``), ``val/loss``, ``val/accuracy``,
  ``train/learning_rate``;
* mean only: ``perf/step_time_ms`` (wall time per step between the epoch's step events, the
  first, compiling step of the run and the evaluations left out), ``perf/epoch_time_s``,
  ``perf/peak_memory_mib`` (:func:`~subspace_jax.train.peak_memory_bytes`), ``run/dim`` (d;
  written at step 0 too);
* at the end of the run (``run_end``), per seed and mean: ``test/accuracy``, ``test/loss``.

Neither backend is a dependency of subspace-jax: ``pip install 'subspace-jax[tensorboard]'``
(the ``tensorboard`` package's own event writer; TensorFlow is not needed) and
``pip install 'subspace-jax[wandb]'``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

#: The ``--log`` kinds.
LOG_KINDS = ("tensorboard", "wandb")
#: What to install for each kind (the error line of a missing one names it).
INSTALL = {
    "tensorboard": "pip install 'subspace-jax[tensorboard]' (or: pip install tensorboard)",
    "wandb": "pip install 'subspace-jax[wandb]' (or: pip install wandb)",
}
#: The module each kind imports.
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: Folder under the command's output folder for ``--log tensorboard`` without a folder (W&B
#: keeps its own files in ``wandb/`` there).
TENSORBOARD_SUBDIR = "tensorboard"
#: W&B project when ``--log wandb`` names none (``WANDB_PROJECT`` overrides it).
DEFAULT_WANDB_PROJECT = "subspace-jax"

#: Every scalar name a run may hold.
TAGS = (
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "train/learning_rate",
    "perf/step_time_ms",
    "perf/epoch_time_s",
    "perf/peak_memory_mib",
    "run/dim",
    "test/accuracy",
    "test/loss",
)


@dataclasses.dataclass(frozen=True)
class LogSpec:
    """One ``--log`` value: ``kind`` and its optional ``target`` (a folder for TensorBoard,
    a project for W&B)."""

    kind: str
    target: str | None = None


def parse_log_specs(values: Sequence[str] | None) -> list[LogSpec]:
    """Parse repeated, comma-separated ``--log`` values (``tensorboard[:DIR]``,
    ``wandb[:PROJECT]``).

    Raises:
      ValueError: an unknown kind, an empty target, or a kind given twice.
    """
    specs: list[LogSpec] = []
    for value in values or ():
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            kind, sep, target = part.partition(":")
            kind = kind.strip().lower()
            if kind not in LOG_KINDS:
                raise ValueError(
                    f"--log {part!r}: unknown log {kind!r}; choose tensorboard[:DIR] or "
                    "wandb[:PROJECT]"
                )
            if sep and not target.strip():
                raise ValueError(f"--log {part!r}: nothing after ':'")
            if any(s.kind == kind for s in specs):
                raise ValueError(f"--log {kind} is given twice")
            specs.append(LogSpec(kind, target.strip() if sep else None))
    return specs


def check_installed(specs: Sequence[LogSpec]) -> None:
    """Raise ``ValueError`` naming the pip command for a log whose package is missing."""
    for spec in specs:
        if importlib.util.find_spec(_MODULE[spec.kind]) is None:
            raise ValueError(
                f"--log {spec.kind} needs the {_MODULE[spec.kind]} package, which is not "
                f"installed: {INSTALL[spec.kind]}"
            )


# ------------------------------------------------------------------------------ backends


class Handle(Protocol):
    """One logged run: scalars at a step, flushed, closed."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class Backend(Protocol):
    """Opens one :class:`Handle` per logged run (``name`` like ``d=300/seed=0``)."""

    def open(self, name: str, meta: Mapping[str, Any]) -> Handle: ...


class _TensorBoardHandle:
    def __init__(self, folder: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        folder.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(folder), flush_secs=10)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TensorBoardBackend:
    """Event files under ``root/<name>`` (``root/d=300/seed=0/events.out.tfevents.*``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def open(self, name: str, meta: Mapping[str, Any]) -> Handle:
        del meta
        return _TensorBoardHandle(self.root / name)


class _WandbHandle:
    def __init__(self, run):
        self._run = run
        self._step = -1

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        # W&B keeps steps increasing: a second write at the same step merges into it.
        self._step = max(self._step, int(step))
        self._run.log(dict(scalars), step=self._step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._run.finish()


class WandbBackend:
    """One W&B run per logged run, all of one command in one group.

    Args:
      project: the W&B project (``WANDB_PROJECT`` and then ``DEFAULT_WANDB_PROJECT`` when None).
      group: the group of the command's runs (``WANDB_RUN_GROUP`` overrides it).
      folder: where W&B keeps its files (``folder/wandb/``; offline runs stay there until
        ``wandb sync``).
      job_type: the command (``train``, ``sweep``, ``id``).
      config: the command's configuration, recorded in every run.
    """

    def __init__(
        self,
        project: str | None,
        group: str,
        folder: str | os.PathLike,
        job_type: str,
        config: Mapping[str, Any] | None = None,
    ):
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT
        self.group = os.environ.get("WANDB_RUN_GROUP") or group
        self.folder = Path(folder)
        self.job_type = job_type
        self.config = dict(config or {})
        self._opened = False

    def shutdown(self) -> None:
        """Wait for W&B's service to write every finished run: ``run.finish()`` returns
        before the service has flushed the files of runs open at the same time."""
        if self._opened:
            import wandb

            wandb.teardown()
            self._opened = False

    def open(self, name: str, meta: Mapping[str, Any]) -> Handle:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                project=self.project,
                group=self.group,
                name=name,
                job_type=self.job_type,
                dir=str(self.folder),
                config={**self.config, **meta},
                reinit="create_new",  # the seeds of one d are logged at the same time
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # wandb raises its own types (no key, no network, ...)
            raise ValueError(
                f"--log wandb: cannot start a W&B run ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); without an account or a network, "
                "set WANDB_MODE=offline and sync later with `wandb sync`"
            ) from None
        self._opened = True
        return _WandbHandle(run)


# ------------------------------------------------------------------------------ the consumer

_RETRY = re.compile(r"retrying seeds \[([\d,\s]*)\].*?learning rate (\S+) \(retry (\d+)")


def _mib(n: int) -> float:
    return n / 2**20


class RunLogs:
    """A progress callback that writes each training's scalars to one or more backends.

    Feed it every progress event (``run_start``, ``step``, ``epoch``, ``diverged``,
    ``message``, ``run_end``); call :meth:`close` at the end (or use it as a context manager).
    ``run_start`` (``dim``, ``seeds``) opens the runs of one training; ``train``, which emits
    none, gets one from the command line (or the runs open at the first epoch, named by
    ``dim``).

    Args:
      backends: where to write.
      memory: ``() -> bytes`` of peak memory (default
        :func:`subspace_jax.train.peak_memory_bytes`).
      clock: seconds, monotonic (injectable for tests).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        memory: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.backends = list(backends)
        if memory is None:
            from subspace_jax.train import peak_memory_bytes as memory
        self.memory = memory
        self.clock = clock
        self._open: dict[str, list[Handle]] = {}
        self.dim: int | None = None
        self.seeds: list[int] = []
        self._attempt = 0
        self._active: list[int] = []  # the seeds of the current attempt, in event order
        self._lr: float | None = None
        self._reset_timing()

    # -- runs

    def _handles(self, name: str, meta: Mapping[str, Any]) -> list[Handle]:
        if name not in self._open:
            self._open[name] = [b.open(name, meta) for b in self.backends]
        return self._open[name]

    def _name(self, who: str) -> str:
        return f"d={self.dim}/{who}" if self.dim is not None else who

    def _write(self, who: str, step: int, scalars: Mapping[str, float | None], meta=None):
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        if not scalars:
            return
        for h in self._handles(self._name(who), {"dim": self.dim, **(meta or {})}):
            h.write(step, scalars)

    def _seed_who(self, seed: int) -> str:
        return f"seed={seed}" + (f"/retry={self._attempt}" if self._attempt else "")

    def _start(self, dim: int | None, seeds: Sequence[int]) -> None:
        self._finish_run()
        self.dim = None if dim is None else int(dim)
        self.seeds = [int(s) for s in seeds]
        self._active = list(self.seeds)
        self._attempt = 0
        self._lr = None
        self._reset_timing()
        if self.dim is not None:
            self._write("mean", 0, {"run/dim": self.dim}, {"seed": "mean"})
            for s in self.seeds:
                self._handles(self._name(f"seed={s}"), {"dim": self.dim, "seed": s})

    def _finish_run(self) -> None:
        handles = [h for hs in self._open.values() for h in hs]
        self._open = {}
        errors = []
        for h in handles:  # close them all, even if one fails
            try:
                h.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Close every open run and wait until each backend has written its files."""
        self._finish_run()
        for b in self.backends:
            shutdown = getattr(b, "shutdown", None)
            if shutdown is not None:
                shutdown()

    def __enter__(self) -> RunLogs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- timing between step events

    def _reset_timing(self) -> None:
        self._t_last: float | None = None
        self._s_last = 0
        self._epoch_dt = 0.0
        self._epoch_steps = 0

    def _on_step(self, step: int) -> None:
        now = self.clock()
        if self._t_last is None or step < self._s_last:
            # The first event of a run (its step compiles) or of a retry: timing starts here.
            self._t_last, self._s_last = now, step
            return
        self._epoch_dt += now - self._t_last
        self._epoch_steps += step - self._s_last
        self._t_last, self._s_last = now, step

    # -- events

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run_start":
            self._start(event.get("dim"), event.get("seeds", ()))
        elif kind == "step":
            self._on_step(int(event["step"]))
        elif kind == "epoch":
            self._on_epoch(event)
        elif kind == "message":
            m = _RETRY.search(str(event.get("text", "")))
            if m:
                self._attempt = int(m.group(3))
                self._active = [int(s) for s in m.group(1).split(",") if s.strip()]
                self._lr = float(m.group(2))
        elif kind == "run_end":
            self._on_end(event)
            self._finish_run()

    def _on_epoch(self, event: Mapping[str, Any]) -> None:
        n = len(event["per_seed_val_accuracy"])
        seeds = [int(s) for s in event.get("seeds", self._active)]
        if len(seeds) != n:  # a caller that sent no run_start: name the seeds by position
            seeds = self.seeds if len(self.seeds) == n else list(range(n))
        if not self.seeds:
            self.seeds = list(seeds)
            self._active = list(seeds)
        lr = event.get("learning_rate", self._lr)
        step = int(event["steps"])
        per_seed = {
            "train/loss": event.get("per_seed_train_loss"),
            "train/accuracy": event.get("per_seed_train_accuracy"),
            "val/loss": event.get("per_seed_val_loss"),
            "val/accuracy": event.get("per_seed_val_accuracy"),
        }
        for i, seed in enumerate(seeds):
            scalars = {tag: values[i] for tag, values in per_seed.items() if values is not None}
            scalars["train/learning_rate"] = lr
            self._write(self._seed_who(seed), step, scalars, {"seed": seed})
        if not self._attempt:  # a retry's means cover only the retried seeds: not the run's
            step_ms = 1e3 * self._epoch_dt / self._epoch_steps if self._epoch_steps else None
            self._write(
                "mean",
                step,
                {
                    "train/loss": event.get("train_loss"),
                    "train/accuracy": event.get("train_accuracy"),
                    "val/loss": event.get("val_loss"),
                    "val/accuracy": event.get("val_accuracy"),
                    "train/learning_rate": lr,
                    "perf/step_time_ms": step_ms,
                    "perf/epoch_time_s": event.get("epoch_time_s"),
                    "perf/peak_memory_mib": _mib(self.memory()),
                    "run/dim": self.dim,
                },
                {"seed": "mean"},
            )
        self._epoch_dt, self._epoch_steps = 0.0, 0
        if self._t_last is not None:  # the evaluation just done is not step time
            self._t_last = self.clock()
        for handles in self._open.values():
            for h in handles:
                h.flush()

    def _on_end(self, event: Mapping[str, Any]) -> None:
        """Test metrics from the finished run (``per_seed``, ``test_accuracy``, ...)."""
        step = int(event.get("steps") or self._s_last)
        for rec in event.get("per_seed") or ():
            seed = int(rec["seed"])
            who = f"seed={seed}" + (f"/retry={rec['retries']}" if rec.get("retries") else "")
            self._write(
                who,
                step,
                {"test/accuracy": rec.get("test_accuracy"), "test/loss": rec.get("test_loss")},
                {"seed": seed},
            )
        self._write(
            "mean",
            step,
            {"test/accuracy": event.get("test_accuracy"), "test/loss": event.get("test_loss")},
            {"seed": "mean"},
        )


def run_end_event(result: Mapping[str, Any]) -> dict:
    """The ``run_end`` event of a finished training, from its result dict."""
    return {
        "event": "run_end",
        "dim": int(result["dim"]),
        "val_accuracy": result["val_accuracy"],
        "wall_time_s": result["wall_time_s"],
        "steps": int(result["steps"]),
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "per_seed": result["per_seed"],
    }


def fan_out(*consumers: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """One progress callback that passes each event to every consumer given (None skipped)."""
    live = [c for c in consumers if c is not None]

    def progress(event: dict) -> None:
        for c in live:
            c(event)

    return progress
