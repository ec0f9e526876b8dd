"""Fault-injection helpers shared by the test modules (imported by them; collects no tests).

Two ways to kill a process with SIGKILL:

* :func:`kill_after`: run a command (e.g. :func:`cli` ``("train", ...)``) and SIGKILL it after a
  chosen number of seconds: a random moment of a real run.
* :func:`python_killed_at_event`: run a Python snippet in which the process SIGKILLs itself at
  its k-th *file event*: each ``write`` to a file opened with ``os.fdopen`` (how
  ``subspace_jax._results.atomic_write`` opens its temporary file), each ``os.fsync`` and each
  ``os.replace``. :func:`count_events` counts the events of the same code in-process, so a test
  can pick k at random among them and hit every phase of a save (a partly written temporary
  file, before the fsync, before and after the rename) reproducibly.

And three ways to damage a file's bytes: :func:`truncations`, :func:`byte_changes` and
:func:`bit_flips`, each drawing positions from a seeded ``numpy`` generator.

Example:
  >>> n = count_events(lambda: write_json(path, obj))
  >>> proc = python_killed_at_event(k, "from subspace_jax._results import write_json; ...")
  >>> assert proc.returncode == -signal.SIGKILL
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent


def cli(*args) -> list[str]:
    """The command line of ``subspace-jax ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "subspace_jax", *map(str, args)]


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``subspace-jax ARGS`` to completion, capturing its text output."""
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout)


def kill_after(cmd: list[str], seconds: float, *, timeout: float = 300) -> int:
    """Start ``cmd``, SIGKILL it (its whole process group) after ``seconds`` if it is still
    running, and return its exit status (``-9`` when killed)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call created, nothing else
        return proc.wait(timeout)


class _Counted:
    """A file object whose writes are file events."""

    def __init__(self, f, on_event: Callable[[], None]):
        self._f = f
        self._on_event = on_event

    def write(self, data):
        self._on_event()
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _patch(on_event: Callable[[], None]) -> Callable[[], None]:
    """Route ``os.fdopen`` files' writes, ``os.fsync`` and ``os.replace`` through
    ``on_event``; returns the function that undoes it."""
    fdopen, fsync, replace = os.fdopen, os.fsync, os.replace

    def counted_fdopen(*args, **kwargs):
        return _Counted(fdopen(*args, **kwargs), on_event)

    def counted_fsync(fd):
        on_event()
        return fsync(fd)

    def counted_replace(*args, **kwargs):
        on_event()
        return replace(*args, **kwargs)

    os.fdopen, os.fsync, os.replace = counted_fdopen, counted_fsync, counted_replace

    def undo():
        os.fdopen, os.fsync, os.replace = fdopen, fsync, replace

    return undo


def install_kill_at(k: int) -> None:
    """Make this process SIGKILL itself at its k-th file event (for the child's snippet)."""
    seen = 0

    def on_event():
        nonlocal seen
        seen += 1
        if seen == k:
            os.kill(os.getpid(), signal.SIGKILL)

    _patch(on_event)


@contextlib.contextmanager
def _counting() -> Iterator[list[int]]:
    count = [0]

    def on_event():
        count[0] += 1

    undo = _patch(on_event)
    try:
        yield count
    finally:
        undo()


def count_events(fn: Callable[[], object]) -> int:
    """How many file events ``fn()`` makes in this process."""
    with _counting() as count:
        fn()
    return count[0]


def python_killed_at_event(k: int, code: str, *, timeout: float = 300):
    """Run the snippet ``code`` in a fresh interpreter that SIGKILLs itself at file event k.

    Returns:
      The ``subprocess.CompletedProcess`` (``returncode == -9`` when the kill happened).
    """
    prelude = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport _faults\n"
    prelude += f"_faults.install_kill_at({int(k)})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def truncations(data: bytes, rng: np.random.Generator, n: int) -> Iterator[tuple[str, bytes]]:
    """``n`` copies of ``data`` cut at random lengths in ``[0, len(data) - 1]``."""
    for cut in rng.integers(0, len(data), size=n):
        yield f"cut at byte {cut}", data[:cut]


def byte_changes(data: bytes, rng: np.random.Generator, n: int) -> Iterator[tuple[str, bytes]]:
    """``n`` copies of ``data`` with one byte at a random position changed to another value."""
    positions, xors = rng.integers(0, len(data), size=n), rng.integers(1, 256, size=n)
    for pos, xor in zip(positions, xors, strict=True):
        damaged = bytearray(data)
        damaged[pos] ^= int(xor)
        yield f"byte {pos} xor {xor:#04x}", bytes(damaged)


def bit_flips(data: bytes, rng: np.random.Generator, n: int) -> Iterator[tuple[str, bytes]]:
    """``n`` copies of ``data`` with one random bit flipped."""
    for bit in rng.integers(0, 8 * len(data), size=n):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << int(bit % 8)
        yield f"bit {bit}", bytes(damaged)
