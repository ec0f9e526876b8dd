"""An exclusive lock on a results folder, so two processes never train into one ``runs.jsonl``.

The lock is ``fcntl.flock`` on ``<folder>/.lock``, which holds the owner's pid (for the error
message only). The kernel drops a flock when its process dies, however it dies, so a lock file
left behind by a killed process never blocks anyone: only a live holder does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class FolderLocked(RuntimeError):
    """Another live process holds the lock on a results folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def lock_folder(
    folder: str | os.PathLike,
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the ``with`` block.

    Args:
      folder: the results folder.
      wait: block until the holder finishes instead of raising.
      on_wait: called once with a message (naming the holder) before blocking.

    Yields:
      The lock file's path.

    Raises:
      FolderLocked: ``wait`` is False and a live process holds the lock; the message names
        its pid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise FolderLocked(
                    f"{folder} is in use by {holder} (lock file {path}); wait for it to "
                    "finish, pass --wait to wait for it, or choose another --out"
                ) from None
            if on_wait is not None:
                on_wait(f"waiting for {holder}, which holds {folder} (lock file {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
