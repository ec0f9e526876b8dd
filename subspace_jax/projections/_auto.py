"""Pick a projection for ``(D, d)`` from the memory available: ``--projection auto``.

The rule, in order:

1. ``dense`` (stored Gaussian with unit columns, the library default and the fastest on GPU)
   when ``DENSE_WORKING_FACTOR * state_bytes = 3 * 4 D d`` bytes fit in the budget. The
   factor covers the matrix, its generation block and the copies XLA may make around it.
2. Otherwise the fastest matrix-free projection: ``fastfood`` (``O(D log D)`` per call) when it
   is registered and allows this ``d``;
3. otherwise ``dense_hash`` (hashed random signs, ``O(D d)`` per call, no storage).

The budget defaults to half of the memory available on the default device: free GPU memory
(``bytes_limit - bytes_in_use`` from ``jax.devices()[0].memory_stats()``) on an accelerator,
else ``MemAvailable`` from ``/proc/meminfo`` (or ``os.sysconf`` where that file is missing).
Nothing named ``auto`` is registered: callers resolve the name first.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from subspace_jax.projections._base import check_sizes, get_projection, projection_names

#: Memory a stored dense projection needs, as a multiple of its state (matrix + working copies).
DENSE_WORKING_FACTOR = 3
#: Fraction of the available memory the default budget allows.
DEFAULT_BUDGET_FRACTION = 0.5


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory_bytes() -> int:
    """Bytes free on JAX's default device: free accelerator memory, else available host RAM."""
    if jax.default_backend() != "cpu":
        try:
            stats = jax.devices()[0].memory_stats()
        except Exception:  # backends without memory statistics
            stats = None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return _host_available_bytes()


def choose_projection(D: int, d: int, *, memory_budget_bytes: int | None = None) -> str:
    """The name of the fastest projection for ``(D, d)`` that fits in the memory budget.

    Args:
      D: number of parameters (rows of P).
      d: subspace dimension, in ``[1, D]``.
      memory_budget_bytes: bytes the projection may use; default half of
        :func:`available_memory_bytes`.

    Returns:
      ``"dense"`` if ``3 * 4 D d`` bytes fit, else ``"fastfood"`` if registered and valid for
      ``d``, else ``"dense_hash"``.

    Raises:
      ValueError: for invalid sizes or a non-positive budget.

    Example:
      >>> choose_projection(1000, 10, memory_budget_bytes=10**9)
      'dense'
    """
    D, d = check_sizes("choose_projection", D, d)
    if memory_budget_bytes is None:
        budget = int(DEFAULT_BUDGET_FRACTION * available_memory_bytes())
    else:
        if isinstance(memory_budget_bytes, bool) or not isinstance(
            memory_budget_bytes, (int, np.integer)
        ):
            raise ValueError(
                f"memory_budget_bytes must be a positive integer, got {memory_budget_bytes!r}"
            )
        budget = int(memory_budget_bytes)
        if budget <= 0:
            raise ValueError(f"memory_budget_bytes must be >= 1, got {budget}")
    if DENSE_WORKING_FACTOR * get_projection("dense").state_bytes(D, d) <= budget:
        return "dense"
    if "fastfood" in projection_names() and d <= get_projection("fastfood").max_dim(D):
        return "fastfood"
    return "dense_hash"
