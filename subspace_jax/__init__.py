"""subspace-jax: train JAX/Flax networks in random parameter subspaces.

``theta = theta0 + P w``: the network's D parameters are driven by d << D numbers ``w``
through a fixed random projection P; optax updates only ``w``.
"""

from subspace_jax import projections
from subspace_jax._archive import CompressedModelError
from subspace_jax._errors import UserError
from subspace_jax._save import load_subspace, save_subspace
from subspace_jax._subspace import (
    Group,
    Layout,
    NonFiniteStateError,
    Subspace,
    Trainable,
    allocate_dims,
    as_trainable,
    check_finite,
    init_from_layout,
    init_subspace,
    init_trainable,
    make_layout,
    split_collections,
    to_params,
)
from subspace_jax._tree import FlatSpec, LeafSpec, flatten, leaf_specs, unflatten
from subspace_jax.projections import (
    Projection,
    default_learning_rate,
    get_projection,
    make_projection,
    projection_names,
    register,
)

__version__ = "0.1.0"

__all__ = [
    "CompressedModelError",
    "FlatSpec",
    "Group",
    "Layout",
    "LeafSpec",
    "NonFiniteStateError",
    "Projection",
    "Subspace",
    "Trainable",
    "UserError",
    "allocate_dims",
    "as_trainable",
    "check_finite",
    "default_learning_rate",
    "flatten",
    "get_projection",
    "init_from_layout",
    "init_subspace",
    "init_trainable",
    "leaf_specs",
    "load_subspace",
    "make_layout",
    "make_projection",
    "projection_names",
    "projections",
    "register",
    "save_subspace",
    "split_collections",
    "to_params",
    "unflatten",
]
