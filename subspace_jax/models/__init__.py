"""Classifiers as pure ``init / apply`` pairs, by name: MLPs, LeNets, CIFAR ResNets, a ViT."""

from subspace_jax.models._lenet import LeNet, lenet_spatial_sizes
from subspace_jax.models._mlp import MLP
from subspace_jax.models._registry import (
    DEFAULT_GRID_TARGETS,
    GRID_MODELS,
    MODELS,
    ModelDef,
    ModelSpec,
    build_model,
    classifier_path,
    count_params,
    from_config,
    model_names,
    small_model_grid,
    state_collections,
)
from subspace_jax.models._resnet import ResNet
from subspace_jax.models._vit import ViT

__all__ = [
    "DEFAULT_GRID_TARGETS",
    "GRID_MODELS",
    "LeNet",
    "MLP",
    "MODELS",
    "ModelDef",
    "ModelSpec",
    "ResNet",
    "ViT",
    "build_model",
    "classifier_path",
    "count_params",
    "from_config",
    "lenet_spatial_sizes",
    "model_names",
    "small_model_grid",
    "state_collections",
]
