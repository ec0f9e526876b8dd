"""Random projections R^d -> R^D as pure ``init / apply / transpose`` triples, by name."""

from subspace_jax.projections import (  # noqa: F401  (importing registers the projections)
    _dense,
    _fastfood,
    _regen,
    _sparse,
    _sparse_formats,
)
from subspace_jax.projections._auto import choose_projection
from subspace_jax.projections._base import (
    LR_KNEE,
    LR_RULE,
    SUBSPACE_BASE_LR,
    Projection,
    as_matrix,
    check_sizes,
    default_learning_rate,
    get_projection,
    linear_map,
    lr_dim_factor,
    make_projection,
    projection_from_options,
    projection_names,
    register,
)
from subspace_jax.projections._dense import DenseState, gaussian_matrix
from subspace_jax.projections._fastfood import fastfood
from subspace_jax.projections._hadamard import fwht
from subspace_jax.projections._sparse import SPARSE_VARIANTS

__all__ = [
    "LR_KNEE",
    "LR_RULE",
    "DenseState",
    "Projection",
    "SPARSE_VARIANTS",
    "SUBSPACE_BASE_LR",
    "as_matrix",
    "check_sizes",
    "choose_projection",
    "default_learning_rate",
    "fastfood",
    "fwht",
    "gaussian_matrix",
    "get_projection",
    "linear_map",
    "lr_dim_factor",
    "make_projection",
    "projection_from_options",
    "projection_names",
    "register",
]
