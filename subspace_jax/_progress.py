"""Progress on stderr, fed by the training loop's progress events.

Three modes, chosen by the stream and ``--quiet``:

* a terminal (``stream.isatty()``): one live bar, redrawn in place, with the rate and the
  ETA (steps of the current run; runs of a sweep or search; cells of a benchmark), and a
  line per epoch, run and message above it;
* anything else (a file, a pipe, CI): plain lines only, one per epoch, run and message, and a
  step line at most every ``every_s`` seconds while a run is long;
* quiet: nothing.

Events are the dicts of :func:`subspace_jax.train.train_and_evaluate`'s ``progress`` callback
(``step``, ``epoch``, ``diverged``, ``message``) and of the sweep and search (``run_start``,
``run_end``, ``run_reused``). A step event carries the run's ``step`` and ``total_steps``;
steps may advance by more than one between events.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

#: Characters of the bar itself.
BAR_WIDTH = 24
#: Seconds between two redraws of the bar on a terminal.
REDRAW_S = 0.1
#: Seconds between two plain step lines (not a terminal).
PLAIN_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """``75.2 -> '1:15'``, ``3725 -> '1:02:05'``; ``'?'`` when unknown."""
    if seconds is None or not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _rate_text(rate: float | None, unit: str) -> str:
    if not rate:
        return f"? {unit}/s"
    if rate >= 1:
        return f"{rate:.1f} {unit}/s"
    return f"{1 / rate:.1f} s/{unit[:-1] if unit.endswith('s') else unit}"


def _fmt(value: float | None) -> str:
    """A mean over seeds: None (every seed diverged) prints as ``n/a``."""
    return "n/a" if value is None else f"{value:.4f}"


class _Rate:
    """Units done per second since the first update (the first unit is left out: it compiles)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.t0: float | None = None
        self.n0 = 0
        self.n = 0

    def reset(self) -> None:
        self.t0, self.n0, self.n = None, 0, 0

    def update(self, n: int) -> None:
        if self.t0 is None or n < self.n:  # first event, or the count restarted (a retry)
            self.t0, self.n0 = self.clock(), n
        self.n = n

    def rate(self) -> float | None:
        if self.t0 is None or self.n <= self.n0:
            return None
        dt = self.clock() - self.t0
        return (self.n - self.n0) / dt if dt > 0 else None

    def eta(self, total: int | None) -> float | None:
        r = self.rate()
        if total is None or not r:
            return None
        return max(total - self.n, 0) / r


class ProgressPrinter:
    """Progress of ``train``, ``sweep`` and ``id`` on stderr (see the module docstring).

    Args:
      stream: where to write (default ``sys.stderr``).
      quiet: print nothing.
      total_runs: trainings the command will run or reuse (a sweep: one per d and the
        baseline), for the ``run k/N`` counter and the sweep's ETA; None when unknown (a
        search).
      clock: seconds, monotonic (injectable for tests).
      every_s: seconds between plain step lines when the stream is not a terminal.
    """

    def __init__(
        self,
        stream=None,
        quiet: bool = False,
        *,
        total_runs: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
        every_s: float = PLAIN_EVERY_S,
    ):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.quiet = quiet
        self.clock = clock
        self.every_s = every_s
        self.t0 = clock()
        self.total_runs = total_runs
        self.runs_done = 0
        self.run_index = 0
        self.trained = 0  # runs trained (not reused) so far, and their seconds
        self.trained_s = 0.0
        self.in_run = False
        self.run_t0 = self.t0
        self.dim: int | None = None
        self.steps = _Rate(clock)
        self.runs = _Rate(clock)
        self._last_draw = -float("inf")
        self._last_plain = clock()
        self._bar_shown = False

    # -- output helpers

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _clear_bar(self) -> None:
        if self.tty and self._bar_shown:
            self._write("\r\033[K")
            self._bar_shown = False

    def _line(self, text: str) -> None:
        """One line of progress above the bar (the bar is drawn again by the next step)."""
        self._clear_bar()
        self._write(text + "\n")

    def _run_tag(self, run_eta: float | None = None) -> str:
        """``run k/N, sweep ETA m:ss``: the ETA counts the runs left at the mean time of the
        runs trained so far (reused runs take none), the current one at ``run_eta`` when
        known."""
        if not self.run_index:
            return ""
        total = f"/{self.total_runs}" if self.total_runs else ""
        tag = f"run {self.run_index}{total}"
        if self.total_runs:
            left = self.total_runs - self.runs_done
            if not left:
                eta = 0.0
            elif self.trained:
                per_run = self.trained_s / self.trained
                if run_eta is not None and self.in_run:
                    eta = run_eta + (left - 1) * per_run
                elif self.in_run:
                    eta = max(left * per_run - (self.clock() - self.run_t0), 0.0)
                else:
                    eta = left * per_run
            else:
                eta = None
            tag += f", sweep ETA {format_duration(eta)}"
        return tag

    # -- events

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        kind = event.get("event")
        if kind == "step":
            self._step(event)
        elif kind == "epoch":
            self._line(
                f"  epoch {event['epoch']:3d}  train loss {_fmt(event['train_loss'])}  "
                f"val acc {_fmt(event['val_accuracy'])}  ({self.clock() - self.t0:.1f}s)"
            )
        elif kind == "diverged":
            self._line(
                f"  seed {event['seed']} diverged at step {event['step']} (learning rate "
                f"{event['learning_rate']:g}): it stops updating there"
            )
        elif kind == "run_start":
            self.run_index = self.runs_done + 1
            self.dim = event["dim"]
            self.steps.reset()
            self.in_run, self.run_t0 = True, self.clock()
            tag = self._run_tag()
            self._line(f"d = {event['dim']} seeds {event['seeds']}" + (f"  [{tag}]" if tag else ""))
        elif kind == "run_end":
            self.runs_done += 1
            if self.in_run:
                self.trained += 1
                self.trained_s += self.clock() - self.run_t0
            self.in_run = False
            self._line(
                f"d = {event['dim']} done: mean val acc {_fmt(event['val_accuracy'])} "
                f"in {event['wall_time_s']:.1f}s"
            )
        elif kind == "run_reused":
            self.runs_done += 1
            self.run_index = self.runs_done
            tag = self._run_tag()
            self._line(
                f"d = {event['dim']} seeds {event['seeds']}: reused from runs.jsonl"
                + (f"  [{tag}]" if tag else "")
            )
        elif kind == "message":
            self._line(event["text"])

    def _step(self, event: dict) -> None:
        done, total = int(event["step"]), int(event["total_steps"])
        self.steps.update(done)
        now = self.clock()
        last = done >= total
        if self.tty:
            if now - self._last_draw < REDRAW_S and not last:
                return
            self._last_draw = now
            self._write("\r\033[K" + self.bar_text(event))
            self._bar_shown = True
        elif now - self._last_plain >= self.every_s and not last and self.steps.rate():
            self._last_plain = now
            self._write(self.plain_step_text(event) + "\n")

    def bar_text(self, event: dict) -> str:
        """``  epoch 2 [#####.....] 120/400 steps 35.1 steps/s ETA 0:08 | run 3/8``."""
        done, total = int(event["step"]), int(event["total_steps"])
        filled = int(BAR_WIDTH * min(done, total) / max(total, 1))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        epoch = event.get("epoch")
        head = f"  epoch {int(epoch) + 1} " if epoch is not None else "  "
        text = (
            f"{head}[{bar}] {done}/{total} steps  {_rate_text(self.steps.rate(), 'steps')}  "
            f"ETA {format_duration(self.steps.eta(total))}"
        )
        tag = self._run_tag(self.steps.eta(total))
        return text + (f" | {tag}" if tag else "")

    def plain_step_text(self, event: dict) -> str:
        """``  step 1200/4000 (30%), 41.2 steps/s, ETA 1:08``."""
        done, total = int(event["step"]), int(event["total_steps"])
        text = (
            f"  step {done}/{total} ({100 * done / max(total, 1):.0f}%), "
            f"{_rate_text(self.steps.rate(), 'steps')}, "
            f"ETA {format_duration(self.steps.eta(total))}"
        )
        tag = self._run_tag(self.steps.eta(total))
        return text + (f" [{tag}]" if tag else "")

    def close(self) -> None:
        """Clear a bar left on the terminal."""
        if not self.quiet:
            self._clear_bar()


class CountBar:
    """A counter of finished units (bench cells) with rate and ETA, drawn on a terminal only.

    Plain streams get nothing from it (the caller prints its own line per unit).
    """

    def __init__(
        self,
        total: int,
        unit: str,
        stream=None,
        quiet: bool = False,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.quiet = quiet
        self.total = total
        self.unit = unit
        self.clock = clock
        self.t0 = clock()
        self.done = 0
        self._shown = False

    def clear(self) -> None:
        if self.tty and self._shown and not self.quiet:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def text(self) -> str:
        """``  [#####.....] 3/10 cells  12.0 s/cell  ETA 1:24``."""
        done = min(self.done, self.total)
        filled = int(BAR_WIDTH * done / max(self.total, 1))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        dt = self.clock() - self.t0
        rate = done / dt if done and dt > 0 else None
        eta = (self.total - done) / rate if rate else None
        return (
            f"  [{bar}] {done}/{self.total} {self.unit}  {_rate_text(rate, self.unit)}  "
            f"ETA {format_duration(eta)}"
        )

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done and redraw (on a terminal)."""
        self.done += n
        if self.tty and not self.quiet:
            self.stream.write("\r\033[K" + self.text())
            self.stream.flush()
            self._shown = True
