"""Intrinsic dimension: d-sweeps and the d_int search."""

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
    "RUNS_FILE",
    "config_key",
    "interpolate_crossing",
    "run_dims",
    "run_sweep",
    "seed_records",
    "summarize_sweep",
    "sweep_definition",
]
