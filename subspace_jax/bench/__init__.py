"""Performance benchmark: step time, setup time and peak memory of each projection against the
direct (full-parameter) training step, one ``(projection, d)`` cell at a time.

For every cell the jitted training step (:func:`subspace_jax.train.make_train_step`, Adam) of
the subspace and of direct training are timed in the same process, side by side: ``warmup``
untimed steps, then ``steps`` timed ones, each blocked until its outputs are ready (device
synchronisation). The direct step is timed just before and just after the subspace step and
its time is the median of both blocks, so slow drifts of a shared machine affect both alike;
``ratio = step_time_ms / direct_step_time_ms``.

Peak memory: on CPU, the peak resident set size of a process (``ru_maxrss``) cannot be reset,
so by default every cell runs in a fresh subprocess (``python -m subspace_jax.bench``) and its
peak is reported next to the peak of a process that ran the direct step alone
(``direct_peak_memory_bytes``). On an accelerator it is the allocator's
``peak_bytes_in_use``. The timing batches are synthetic (normal pixels, random labels) of the
dataset's shape, so no dataset enters the memory figures; real data is read only for the
optional accuracy runs (``accuracy_steps``), after the memory is recorded.

A cell is reported with ``"skipped": "<reason>"`` instead of being run when ``d`` is out of
range, when ``WORKING_FACTOR * state_bytes(D, d)`` exceeds the memory budget (default
``DEFAULT_BUDGET_FRACTION`` of the available memory), when its estimated run time exceeds
``max_cell_seconds`` (a cost model in ``D * d``, see :func:`estimate_cell_seconds`), when
``d`` is above the cell's cap in ``dim_caps``, or when its subprocess dies (e.g. killed for
memory) or fails.

Record fields (:data:`CONTRACT_FIELDS` are in every record, ``None`` where skipped):
``projection, num_params (D), dim (d), step_time_ms, direct_step_time_ms, ratio,
peak_memory_bytes, direct_peak_memory_bytes, setup_time_s`` (drawing P with its jit compile,
blocked until ready, as a user waits for it), ``model, dataset, batch_size, backend``; measured
cells add ``compile_time_s`` (the first step), the raw ``step_times_ms`` and
``direct_step_times_ms``, ``memory_kind``, ``state_bytes``; every record carries
``memory_budget_bytes`` and ``auto_choice`` (what ``--projection auto`` picks for this budget).
With ``isolate="projection"`` (meant for GPUs, where a process start costs seconds) a
projection's dims run in one process in ascending order, so a cell's peak is the peak up to
its d.

For stored dense matrices (``dense``, ``dense_unnormalized``, ``orthogonal``) the record adds
the memory-bandwidth floor ``floor_ms = 2 * D * d * 4 bytes / copy bandwidth``: the step reads
P once for ``P w`` and once for ``P^T g``; the copy bandwidth is measured in the same process
(``(read + write bytes) / time`` of a large ``x + 1``).

Example:
  >>> recs = run_benchmark("mlp_small", "digits", [20], ["dense"], steps=3, batch_size=32,
  ...                      isolate="none", model_overrides={"width": 4})  # doctest: +SKIP
  >>> sorted(recs[0])[:3]  # doctest: +SKIP
  ['backend', 'batch_size', 'copy_bandwidth_gbs']

The package: ``_plan`` decides which cells run and why the others are skipped (plain Python,
no JAX: the rules are tested without running anything), ``_worker`` measures (the direct step
and the cells of one process), ``_run`` validates, measures the direct step, plans, runs the
cells in their processes and plots.
"""

from subspace_jax.bench._plan import (
    CONTRACT_FIELDS,
    DEFAULT_MAX_CELL_SECONDS,
    ISOLATION,
    STORED_DENSE,
    WORKING_FACTOR,
    Record,
)
from subspace_jax.bench._run import (
    Progress,
    estimate_cell_seconds,
    input_shape,
    plot_benchmark,
    run_benchmark,
)
from subspace_jax.bench._worker import copy_bandwidth, cpu_model_name, host_description

__all__ = [
    "CONTRACT_FIELDS",
    "DEFAULT_MAX_CELL_SECONDS",
    "ISOLATION",
    "STORED_DENSE",
    "WORKING_FACTOR",
    "Progress",
    "Record",
    "copy_bandwidth",
    "cpu_model_name",
    "estimate_cell_seconds",
    "host_description",
    "input_shape",
    "plot_benchmark",
    "run_benchmark",
]
