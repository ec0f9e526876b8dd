"""Intrinsic dimension: d-sweeps and the d_int search."""

from subspace_jax.intrinsic_dim._search import (
    ID_JSON,
    ID_PLOT,
    Evaluations,
    SearchSpec,
    bootstrap_crossings,
    run_search,
    search_intrinsic_dim,
    summarise,
)
from subspace_jax.intrinsic_dim._stats import crossing_interval, interpolate_crossing
from subspace_jax.intrinsic_dim._sweep import (
    RUNS_FILE,
    config_key,
    describe_estimate,
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
    "Evaluations",
    "SearchSpec",
    "bootstrap_crossings",
    "config_key",
    "crossing_interval",
    "describe_estimate",
    "interpolate_crossing",
    "run_dims",
    "run_search",
    "run_sweep",
    "search_intrinsic_dim",
    "seed_records",
    "summarise",
    "summarize_sweep",
    "sweep_definition",
]
