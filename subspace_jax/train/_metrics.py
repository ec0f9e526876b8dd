"""Measurements: device-synchronised step time and peak memory (RSS on CPU, allocator on GPU)."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

import jax
import numpy as np


def peak_memory_bytes() -> int:
    """Peak memory of this process so far.

    On GPU/TPU: the allocator's ``peak_bytes_in_use`` of the first device. On CPU: the peak
    resident set size (``ru_maxrss``), which includes the Python process and the data.
    """
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall time in seconds of ``fn()`` (blocked until its outputs are ready), ``repeats`` times."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def median_ms(seconds: list[float]) -> float:
    return float(np.median(seconds) * 1e3) if seconds else float("nan")
