"""Classifiers as pure ``init / apply`` pairs: MLPs and LeNets, by name, with small variants."""

from subspace_jax.models._lenet import LeNet, lenet_spatial_sizes
from subspace_jax.models._mlp import MLP
from subspace_jax.models._registry import (
    DEFAULT_GRID_TARGETS,
    GRID_MODELS,
    MODELS,
    ModelDef,
    ModelSpec,
    build_model,
    count_params,
    from_config,
    model_names,
    small_model_grid,
)

__all__ = [
    "DEFAULT_GRID_TARGETS",
    "GRID_MODELS",
    "LeNet",
    "MLP",
    "MODELS",
    "ModelDef",
    "ModelSpec",
    "build_model",
    "count_params",
    "from_config",
    "lenet_spatial_sizes",
    "model_names",
    "small_model_grid",
]
