"""Intrinsic dimension: d-sweeps and the d_int search."""

from subspace_jax.intrinsic_dim._search import (
    ID_JSON,
    ID_PLOT,
    bootstrap_crossings,
    search_intrinsic_dim,
)
from subspace_jax.intrinsic_dim._sweep import (
    RUNS_FILE,
    config_key,
    interpolate_crossing,
    run_dims,
    run_sweep,
    seed_records,
    summarize_sweep,
    sweep_definition,
)

__all__ = [
    "ID_JSON",
    "ID_PLOT",
    "RUNS_FILE",
    "bootstrap_crossings",
    "config_key",
    "interpolate_crossing",
    "run_dims",
    "run_sweep",
    "search_intrinsic_dim",
    "seed_records",
    "summarize_sweep",
    "sweep_definition",
]
