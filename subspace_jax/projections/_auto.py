"""Pick a projection for ``(D, d)`` from measured speed and the memory available.

``--projection auto``. The rule follows the CPU benchmark (BENCHMARKS.md: step time of every
projection against direct training at D = 159,010 and 472,610): a stored dense P is
memory-bound and was the slowest of the usable projections there from d = 100 on (12-85x the
direct step), the CSR very sparse projection was the fastest up to d ~ 500 and Fastfood from
d ~ 1,000 on (its cost hardly depends on d). In order:

1. ``dense`` (stored Gaussian, unit columns) for tiny problems, ``D d <= DENSE_MAX_ENTRIES``
   (one matmul of at most 4 MiB), when ``DENSE_WORKING_FACTOR * 4 D d`` bytes fit the budget;
2. ``sparse`` (very sparse, CSR) for ``d <= SPARSE_MAX_DIM`` when its state fits;
3. ``fastfood`` (``O(D log d)`` per call, ``O(D)`` memory) when registered and valid for ``d``;
4. otherwise ``dense_hash`` (hashed random signs, no storage).

The budget defaults to half of the memory available on the default device: free GPU memory
(``bytes_limit - bytes_in_use`` from ``jax.devices()[0].memory_stats()``) on an accelerator,
else ``MemAvailable`` from ``/proc/meminfo`` (or ``os.sysconf`` where that file is missing).
Nothing named ``auto`` is registered: callers resolve the name first. The rule was measured on
CPU only; on a GPU a stored dense P may win for moderate ``D d`` (not measured here).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from subspace_jax.projections._base import check_sizes, get_projection, projection_names

#: Memory a stored dense projection needs, as a multiple of its state (matrix + working copies).
DENSE_WORKING_FACTOR = 3
#: Largest ``D * d`` for which a stored dense P is chosen (1M entries: 4 MiB).
DENSE_MAX_ENTRIES = 1 << 20
#: Largest d for which the CSR very sparse projection is chosen over Fastfood.
SPARSE_MAX_DIM = 500
#: Fraction of the available memory the default budget allows (here and in ``bench``).
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
      ``"dense"``, ``"sparse"``, ``"fastfood"`` or ``"dense_hash"`` by the rule of the module
      docstring.

    Raises:
      ValueError: for invalid sizes or a non-positive budget.

    Example:
      >>> choose_projection(1000, 10, memory_budget_bytes=10**9)
      'dense'
      >>> choose_projection(159_010, 750, memory_budget_bytes=10**9)
      'fastfood'
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
    fits = lambda name, factor=1: factor * get_projection(name).state_bytes(D, d) <= budget
    if D * d <= DENSE_MAX_ENTRIES and fits("dense", DENSE_WORKING_FACTOR):
        return "dense"
    if d <= SPARSE_MAX_DIM and "sparse" in projection_names() and fits("sparse", 2):
        return "sparse"
    if "fastfood" in projection_names() and d <= get_projection("fastfood").max_dim(D):
        return "fastfood"
    return "dense_hash"
