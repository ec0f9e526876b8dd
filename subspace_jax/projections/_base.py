"""The projection interface: a pure triple ``init / apply / transpose`` and a registry.

A projection P is a linear map from the subspace R^d to parameter space R^D. It is a
:class:`Projection`, built by a factory that closes over its hyperparameters:

* ``init(key, D, d) -> state``: derives everything from a PRNG key and the sizes. The state is
  a pytree of arrays; static sizes live in pytree auxiliary data (never traced), so
  ``jax.vmap(init, in_axes=(0, None, None))`` over keys works.
* ``apply(state, w) -> delta``: ``P @ w``, ``w`` of shape ``(d,)``, ``delta`` of shape ``(D,)``.
  Differentiable in ``w``: its VJP is ``transpose``.
* ``transpose(state, g) -> gw``: ``P^T @ g``, ``g`` of shape ``(D,)``, ``gw`` of shape ``(d,)``.

Convention: every projection documents its expected column norm ``E||P e_j||``; the library's
default learning rate is divided by it (:func:`default_learning_rate`), so one default serves
every projection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

State = Any
Array = jax.Array


class Projection(NamedTuple):
    """A random linear map R^d -> R^D as pure functions.

    Attributes:
      name: registry name.
      init: ``(key, D, d) -> state``.
      apply: ``(state, w[d]) -> delta[D]``, with ``transpose`` as its VJP.
      transpose: ``(state, g[D]) -> gw[d]``.
      column_norm: ``(D, d) -> float``, the expected Euclidean norm of one column of P.
      state_bytes: ``(D, d) -> int``, bytes the state holds (what must fit in memory).
      max_dim: ``D -> int``, the largest d allowed.
      description: one line for ``--help`` and docs.
    """

    name: str
    init: Callable[[Array, int, int], State]
    apply: Callable[[State, Array], Array]
    transpose: Callable[[State, Array], Array]
    column_norm: Callable[[int, int], float]
    state_bytes: Callable[[int, int], int]
    max_dim: Callable[[int], int]
    description: str


def _zero_cotangent(x):
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def linear_map(
    mv: Callable[[State, Array], Array], rmv: Callable[[State, Array], Array]
) -> Callable[[State, Array], Array]:
    """Make ``mv`` differentiable in its vector argument with ``rmv`` as the VJP.

    The projection state is treated as a constant (zero cotangent): only ``w`` is trained.
    This lets every projection choose its own fastest transpose instead of autodiff's.
    """

    @jax.custom_vjp
    def apply(state, w):
        return mv(state, w)

    def fwd(state, w):
        return mv(state, w), state

    def bwd(state, g):
        return jax.tree_util.tree_map(_zero_cotangent, state), rmv(state, g)

    apply.defvjp(fwd, bwd)
    return apply


def check_sizes(
    name: str, D: Any, d: Any, max_dim: Callable[[int], int] | None = None
) -> tuple[int, int]:
    """Validate the sizes at the boundary, before anything is traced.

    Raises:
      ValueError: naming the bad value and the allowed range.
    """
    for label, v in (("D", D), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name}: {label} must be an integer, got {v!r}")
    D, d = int(D), int(d)
    if D <= 0:
        raise ValueError(f"{name}: D (number of parameters) must be >= 1, got {D}")
    hi = D if max_dim is None else max_dim(D)
    if not 1 <= d <= hi:
        raise ValueError(f"{name}: d must be in [1, {hi}] for D = {D}, got {d}")
    return D, d


def make_projection(
    name: str,
    *,
    init: Callable[[Array, int, int], State],
    mv: Callable[[State, Array], Array],
    rmv: Callable[[State, Array], Array],
    column_norm: Callable[[int, int], float],
    state_bytes: Callable[[int, int], int],
    max_dim: Callable[[int], int] | None = None,
    description: str = "",
) -> Projection:
    """Assemble a :class:`Projection`, adding size checks to ``init`` and a VJP to ``apply``."""
    max_dim = max_dim or (lambda D: D)

    def checked_init(key, D, d):
        D, d = check_sizes(name, D, d, max_dim)
        return init(key, D, d)

    return Projection(
        name=name,
        init=checked_init,
        apply=linear_map(mv, rmv),
        transpose=rmv,
        column_norm=column_norm,
        state_bytes=state_bytes,
        max_dim=max_dim,
        description=description,
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], Projection]] = {}


def register(name: str, factory: Callable[[], Projection]) -> None:
    """Register ``factory`` (no arguments, returns a :class:`Projection`) under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"projection {name!r} is already registered")
    _REGISTRY[name] = factory


def projection_names() -> tuple[str, ...]:
    """Every registered projection name, sorted."""
    return tuple(sorted(_REGISTRY))


@functools.cache
def get_projection(name: str) -> Projection:
    """Look up a projection by name.

    The same name always returns the same object, so functions built from it are stable
    static data under ``jit`` (no recompiles).

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown projection {name!r}; choose one of: {', '.join(projection_names())}"
        )
    return _REGISTRY[name]()


def as_matrix(projection: Projection, state: State, d: int) -> Array:
    """Materialise P (shape ``(D, d)``) by applying it to the identity's columns."""
    eye = jnp.eye(d, dtype=jnp.float32)
    return jax.vmap(lambda e: projection.apply(state, e), out_axes=1)(eye)


#: Default Adam learning rate of w for a projection with unit expected column norm.
SUBSPACE_BASE_LR = 0.03
#: Above this many subspace coordinates the default learning rate falls like ``1/sqrt(d)``.
LR_KNEE = 1000
#: Names the default learning-rate rule (part of the sweep's run key: a new rule retrains).
LR_RULE = f"{SUBSPACE_BASE_LR:g}/E||column|| * min(1, sqrt({LR_KNEE}/d))"


def lr_dim_factor(d: int) -> float:
    """``min(1, sqrt(LR_KNEE / d))``: keeps Adam's parameter-space step bounded as d grows.

    Adam moves every coordinate of ``w`` by about the learning rate, so with near-orthonormal
    columns the step in parameter space has norm ``~ lr * sqrt(d)``. Up to ``LR_KNEE``
    coordinates the default lets it grow; beyond, it holds it at ``0.03 * sqrt(1000) ~ 0.95``
    (at d = D = 159,010 that is an lr of 0.0024, near direct Adam's 1e-3 per coordinate).
    Without it, lr 0.03 at d ~ 30,000 made the training loss rise.
    """
    return min(1.0, (LR_KNEE / max(int(d), 1)) ** 0.5)


def default_learning_rate(
    projection: Projection, D: int, d: int, base: float = SUBSPACE_BASE_LR
) -> float:
    """The default Adam learning rate for ``w``: ``base / E||column|| * lr_dim_factor(d)``.

    Adam's step is invariant to the gradient's scale, so the step it takes in parameter space is
    proportional to the column norm of P; dividing by it makes one ``base`` serve every
    projection (all of ours but the unnormalised ones have unit expected column norm).
    """
    return float(base / projection.column_norm(D, d) * lr_dim_factor(d))
