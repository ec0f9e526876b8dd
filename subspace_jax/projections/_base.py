"""The projection interface: a pure triple ``init / apply / transpose`` and a registry.

A projection P is a linear map from the subspace R^d to parameter space R^D. It is a
:class:`Projection`, built by a factory that closes over its hyperparameters:

* ``init(key, D, d) -> state``: derives everything from a PRNG key and the sizes. The state is
  a pytree of arrays; static sizes live in pytree auxiliary data (never traced), so
  ``jax.vmap(init, in_axes=(0, None, None))`` over keys works.
* ``apply(state, w) -> delta``: ``P @ w``, ``w`` of shape ``(d,)``, ``delta`` of shape ``(D,)``.
  A linear map in ``w`` under every JAX transformation (:func:`linear_map`): ``jvp``,
  ``jacfwd``, ``linearize``, ``vmap``, ``grad``, ``linear_transpose``, ``hessian``; reverse mode
  and transposition run ``transpose``.
* ``transpose(state, g) -> gw``: ``P^T @ g``, ``g`` of shape ``(D,)``, ``gw`` of shape ``(d,)``.

A projection is a value: :func:`make_projection` builds one from ``init`` and the pair
``mv``/``rmv`` (the size metadata is optional), ``init_subspace(..., projection=...)`` takes it
or a registered name, and :func:`register` names it (``overwrite=True`` to replace).

Convention: every projection documents its expected column norm ``E||P e_j||``; the library's
default learning rate is divided by it (:func:`default_learning_rate`), so one default serves
every projection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from subspace_jax._errors import UserError

State = Any
Array = jax.Array


def unit_column_norm(D: int, d: int) -> float:
    """The default ``column_norm``: 1 (columns of unit expected length)."""
    return 1.0


def full_max_dim(D: int) -> int:
    """The default ``max_dim``: ``D`` (any ``d`` from 1 to ``D``)."""
    return D


def state_bytes_from_init(init: Callable[[Array, int, int], State], D: int, d: int) -> int:
    """Bytes of the state ``init(key, D, d)`` would return, from its shapes (nothing runs)."""
    shapes = jax.eval_shape(lambda k: init(k, D, d), jax.random.key(0))
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)))


class _ProjectionFields(NamedTuple):
    name: str
    init: Callable[[Array, int, int], State]
    apply: Callable[[State, Array], Array]
    transpose: Callable[[State, Array], Array]
    column_norm: Callable[[int, int], float]
    state_bytes: Callable[[int, int], int]
    max_dim: Callable[[int], int]
    description: str
    options: tuple = ()


class Projection(_ProjectionFields):
    """A random linear map R^d -> R^D as pure functions.

    Only ``name``, ``init``, ``apply`` and ``transpose`` are required; the size metadata has
    defaults (unit columns, any ``d <= D``, the state's bytes from the shapes ``init`` returns,
    found by ``jax.eval_shape`` without drawing anything). Build one with
    :func:`make_projection` to get ``transpose`` as the derivative of ``apply`` and the size
    checks; a ``Projection`` built directly is differentiated by JAX's own autodiff.

    Attributes:
      name: registry name.
      init: ``(key, D, d) -> state``.
      apply: ``(state, w[d]) -> delta[D]``, with ``transpose`` as its VJP.
      transpose: ``(state, g[D]) -> gw[d]``.
      column_norm: ``(D, d) -> float``, the expected Euclidean norm of one column of P
        (default 1; the default learning rate is divided by it).
      state_bytes: ``(D, d) -> int``, bytes the state holds (what must fit in memory).
      max_dim: ``D -> int``, the largest d allowed (default ``D``).
      description: one line for ``--help`` and docs.
      options: the keyword arguments its registered factory was called with, as sorted
        ``(name, value)`` pairs (``(("shared_signs", False),)`` for
        ``fastfood(shared_signs=False)``); ``()`` for the factory's defaults. A saved model
        names its projection by ``name`` and ``options`` (:func:`projection_from_options`).
    """

    __slots__ = ()

    def __new__(
        cls,
        name: str,
        init: Callable[[Array, int, int], State],
        apply: Callable[[State, Array], Array],
        transpose: Callable[[State, Array], Array],
        column_norm: Callable[[int, int], float] | None = None,
        state_bytes: Callable[[int, int], int] | None = None,
        max_dim: Callable[[int], int] | None = None,
        description: str = "",
        options: tuple = (),
    ):
        if state_bytes is None:
            state_bytes = functools.partial(state_bytes_from_init, init)
        return super().__new__(
            cls,
            name,
            init,
            apply,
            transpose,
            column_norm or unit_column_norm,
            state_bytes,
            max_dim or full_max_dim,
            description,
            tuple(options),
        )


# --------------------------------------------------------------------------------------------
# The linear map primitive: ``mv`` with ``rmv`` as its transpose, under every transformation
# --------------------------------------------------------------------------------------------
#
# ``jax.custom_vjp`` would give ``apply`` the projection's own transpose as its VJP but forbids
# forward mode (``jvp``, ``jacfwd``, ``linearize``, ``hessian``); ``jax.custom_derivatives.
# linear_call`` has no batching rule (so no ``vmap``, ``jacfwd`` or ``jacrev``). One small
# primitive carries both functions as static parameters and states the three facts JAX needs:
#
# * JVP: the map is linear in ``w``, so its tangent is the same map applied to ``w``'s tangent
#   (the state is a constant: its tangent, if any, is ignored, as only ``w`` is trained);
# * transpose: the same primitive with ``mv`` and ``rmv`` swapped (the projection's own fast
#   transpose, never autodiff's);
# * batching: the same primitive over ``jax.vmap``-ed ``mv`` and ``rmv``.
#
# It lowers to ``mv``'s (or ``rmv``'s) own computation, so a jitted step compiles to the same
# program as before. The flat wrappers are cached so that equal calls carry identical
# parameters (no recompiles, eager or jitted).

_linear_map_p = jax.extend.core.Primitive("subspace_linear_map")


class _Flat:
    """``fn`` taking the state's leaves as a list: ``(leaves, x) -> y`` (built once, cached)."""

    def __init__(self, fn: Callable[[State, Array], Array], treedef: Any):
        self.fn, self.treedef = fn, treedef

    def __call__(self, leaves, x):
        return self.fn(jax.tree_util.tree_unflatten(self.treedef, leaves), x)


class _Batched:
    """``fn`` vmapped over the state leaves' batch axes ``dims`` and axis 0 of ``x``."""

    def __init__(self, fn: Callable[[list, Array], Array], dims: tuple[int | None, ...]):
        self.fn, self.dims = fn, dims

    def __call__(self, leaves, x):
        return jax.vmap(self.fn, in_axes=(list(self.dims), 0))(leaves, x)


def _bind(mv, rmv, leaves, x):
    return _linear_map_p.bind(*leaves, x, mv=mv, rmv=rmv)


def _impl(*args, mv, rmv):
    return mv(list(args[:-1]), args[-1])


@functools.lru_cache(maxsize=4096)
def _out_aval(mv, in_avals):
    leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals]
    out = jax.eval_shape(mv, leaves[:-1], leaves[-1])
    return jax.core.ShapedArray(out.shape, out.dtype)


def _abstract_eval(*avals, mv, rmv):
    # Known limitation (for the sharding work): under ``shard_map`` the output is not marked
    # as varying over the manual axes its inputs vary over, so shard_map's replication check
    # does not catch a missing ``psum`` after a projection of sharded inputs.
    return _out_aval(mv, tuple(jax.core.ShapedArray(a.shape, a.dtype) for a in avals))


def _jvp(primals, tangents, *, mv, rmv):
    out = _linear_map_p.bind(*primals, mv=mv, rmv=rmv)
    x_dot = tangents[-1]
    if type(x_dot) is ad.Zero:  # a tangent of the state only: the map is constant in it
        return out, ad.Zero(jax.typeof(out).to_tangent_aval())
    return out, _linear_map_p.bind(*primals[:-1], x_dot, mv=mv, rmv=rmv)


def _transpose(ct, *args, mv, rmv):
    leaves, x = list(args[:-1]), args[-1]
    if not ad.is_undefined_primal(x) or any(map(ad.is_undefined_primal, leaves)):
        raise ValueError(
            "a projection is linear in w only: transpose it with respect to w, with the "
            "projection state as a constant"
        )
    if type(ct) is ad.Zero:
        return [None] * len(leaves) + [ad.Zero(x.aval)]
    # The cotangent of w has w's dtype (a bf16 w with a float32 state gets a bf16 gradient).
    return [None] * len(leaves) + [_bind(rmv, mv, leaves, ct).astype(x.aval.dtype)]


@functools.lru_cache(maxsize=4096)
def _batched_pair(mv, rmv, dims):
    return _Batched(mv, dims), _Batched(rmv, dims)


def _batch(args, dims, *, mv, rmv):
    leaves, x = list(args[:-1]), args[-1]
    size = next(a.shape[b] for a, b in zip(args, dims, strict=True) if b is not None)
    x_dim = dims[-1]
    x = jnp.moveaxis(x, x_dim, 0) if x_dim is not None else jnp.broadcast_to(x, (size, *x.shape))
    bmv, brmv = _batched_pair(mv, rmv, tuple(dims[:-1]))
    return _bind(bmv, brmv, leaves, x), 0


_linear_map_p.def_impl(_impl)
_linear_map_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_linear_map_p] = _jvp
ad.primitive_transposes[_linear_map_p] = _transpose
batching.primitive_batchers[_linear_map_p] = _batch
mlir.register_lowering(_linear_map_p, mlir.lower_fun(_impl, multiple_results=False))


@functools.lru_cache(maxsize=4096)
def _flat_pair(mv, rmv, treedef):
    return _Flat(mv, treedef), _Flat(rmv, treedef)


def linear_map(
    mv: Callable[[State, Array], Array], rmv: Callable[[State, Array], Array]
) -> Callable[[State, Array], Array]:
    """Make ``mv(state, w)`` a linear map in ``w`` whose transpose is ``rmv(state, g)``.

    The result works under every JAX transformation: ``jit``, ``vmap`` (over ``w``, the state
    or both), ``grad``/``vjp``/``jacrev`` (through ``rmv``, the projection's own transpose, never
    autodiff's), ``jvp``/``jacfwd``/``linearize`` (through ``mv``), ``linear_transpose``,
    ``hessian`` and any nesting of them. The state is a constant: it is not differentiated
    (only ``w`` is trained), so derivatives with respect to it are zero.

    ``mv`` and ``rmv`` must be exact transposes of each other (the registry's tests check the
    adjoint identity for every projection).
    """

    def apply(state, w):
        leaves, treedef = jax.tree_util.tree_flatten(state)
        fmv, frmv = _flat_pair(mv, rmv, treedef)
        return _bind(fmv, frmv, leaves, jnp.asarray(w))

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
            raise UserError(f"{name}: {label} must be an integer, got {v!r}")
    D, d = int(D), int(d)
    if D <= 0:
        raise UserError(f"{name}: D (number of parameters) must be >= 1, got {D}")
    hi = D if max_dim is None else max_dim(D)
    if not 1 <= d <= hi:
        raise UserError(f"{name}: d must be in [1, {hi}] for D = {D}, got {d}")
    return D, d


def make_projection(
    name: str,
    *,
    init: Callable[[Array, int, int], State],
    mv: Callable[[State, Array], Array],
    rmv: Callable[[State, Array], Array],
    column_norm: Callable[[int, int], float] | None = None,
    state_bytes: Callable[[int, int], int] | None = None,
    max_dim: Callable[[int], int] | None = None,
    description: str = "",
    options: dict[str, Any] | None = None,
) -> Projection:
    """Assemble a :class:`Projection` from ``init`` and the pair ``mv`` / ``rmv``.

    ``apply`` becomes :func:`linear_map` of ``(mv, rmv)`` (every JAX transformation, ``rmv`` as
    the transpose) and ``init`` checks the sizes first. Only ``init``, ``mv`` and ``rmv`` are
    required; see :class:`Projection` for the defaults of the size metadata. A factory with
    keyword arguments passes them as ``options`` (so a saved model can name the projection).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def init(key, D, d):
      ...     return jax.random.normal(key, (D, d)) / jnp.sqrt(D)
      >>> mine = make_projection("mine", init=init, mv=lambda M, w: M @ w, rmv=lambda M, g: g @ M)
      >>> mine.apply(mine.init(jax.random.key(0), 10, 3), jnp.ones(3)).shape
      (10,)
    """
    max_dim = max_dim or full_max_dim

    def checked_init(key, D, d):
        D, d = check_sizes(name, D, d, max_dim)
        return init(key, D, d)

    if state_bytes is None:
        state_bytes = functools.partial(state_bytes_from_init, init)

    return Projection(
        name=name,
        init=checked_init,
        apply=linear_map(mv, rmv),
        transpose=rmv,
        column_norm=column_norm,
        state_bytes=state_bytes,
        max_dim=max_dim,
        description=description,
        options=tuple(sorted((options or {}).items())),
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[], Projection]] = {}


def register(
    name: str, factory: Callable[[], Projection] | Projection, *, overwrite: bool = False
) -> None:
    """Register a projection under ``name``.

    Args:
      name: the name ``init_subspace(..., projection=name)`` and ``--projection`` accept.
      factory: a function of no arguments returning a :class:`Projection`, or a
        ``Projection`` itself (e.g. ``fastfood(shared_signs=False)``).
      overwrite: replace an existing registration (e.g. when a notebook cell is re-run);
        without it, registering a taken name is an error.

    Raises:
      ValueError: ``name`` is taken and ``overwrite`` is False, or ``factory`` is neither a
        ``Projection`` nor a function.
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"projection {name!r} is already registered (pass overwrite=True to replace it)"
        )
    if isinstance(factory, Projection):
        projection = factory

        def factory():
            return projection

    elif not callable(factory):
        raise ValueError(
            f"register({name!r}, ...) needs a Projection or a function returning one, "
            f"got {type(factory).__name__}"
        )
    _REGISTRY[name] = factory
    _lookup.cache_clear()


def projection_names() -> tuple[str, ...]:
    """Every registered projection name, sorted."""
    return tuple(sorted(_REGISTRY))


def get_projection(name: str | Projection) -> Projection:
    """Look up a projection by name; a :class:`Projection` is returned as it is.

    The same name always returns the same object (until it is registered again), so functions
    built from it are stable static data under ``jit`` (no recompiles).

    Raises:
      ValueError: for an unknown name (listing the known ones) or a value that is neither a
        name nor a ``Projection``.
    """
    if isinstance(name, Projection):
        return name
    if not isinstance(name, str):
        raise ValueError(f"projection must be a registered name or a Projection, got {name!r}")
    return _lookup(name)


@functools.cache
def _lookup(name: str) -> Projection:
    if name not in _REGISTRY:
        raise UserError(
            f"unknown projection {name!r}; choose one of: {', '.join(projection_names())}"
        )
    projection = _REGISTRY[name]()
    if not isinstance(projection, Projection):
        raise ValueError(
            f"the factory registered as {name!r} returned {type(projection).__name__}, "
            "not a Projection"
        )
    return projection


def projection_from_options(name: str, options: dict[str, Any] | None = None) -> Projection:
    """The registered projection ``name``, its factory called with ``options`` if any.

    ``projection_from_options(p.name, dict(p.options))`` rebuilds a projection ``p`` made by a
    registered factory (e.g. ``fastfood(shared_signs=False)``).

    Raises:
      ValueError: an unknown name, or options its factory does not take.
    """
    if not options:
        return get_projection(name)
    get_projection(name)  # an unknown name fails here, listing the known ones
    try:
        projection = _REGISTRY[name](**options)
    except TypeError as e:
        raise ValueError(
            f"the projection registered as {name!r} does not take the options {options}: {e}"
        ) from None
    if not isinstance(projection, Projection):
        raise ValueError(f"the factory registered as {name!r} returned a non-Projection")
    return projection


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
    projection: Any, D: int | None = None, d: int | None = None, base: float = SUBSPACE_BASE_LR
) -> float:
    """The default Adam learning rate for ``w``: ``base / E||column|| * lr_dim_factor(d)``.

    Adam's step is invariant to the gradient's scale, so the step it takes in parameter space is
    proportional to the column norm of P; dividing by it makes one ``base`` serve every
    projection (all of ours but the unnormalised ones have unit expected column norm).

    Args:
      projection: a :class:`Projection` (then give ``D`` and ``d``), or a
        :class:`~subspace_jax.Subspace` (or its :class:`~subspace_jax.Layout`): then every
        group's own projection and sizes count, its column norm weighted by the group's
        dimension (a geometric mean), and ``d`` is the length of ``w``.
      D, d: the sizes, for a ``Projection`` only.
      base: the learning rate at unit column norm and ``d <= LR_KNEE``.

    Raises:
      ValueError: a subspace with no projected leaf (direct training has no subspace default),
        or ``D`` / ``d`` missing for a ``Projection``.

    Example:
      >>> lr = default_learning_rate(sub)  # sub = init_subspace(key, theta0, 100)
    """
    if isinstance(projection, Projection):
        if D is None or d is None:
            raise ValueError("default_learning_rate(projection, D, d) needs the sizes D and d")
        return float(base / projection.column_norm(D, d) * lr_dim_factor(d))
    layout = getattr(projection, "layout", projection)
    groups = getattr(layout, "groups", None)
    if groups is None:
        raise ValueError(
            "default_learning_rate takes a Projection (with D and d) or a Subspace, got "
            f"{type(projection).__name__}"
        )
    if D is not None or d is not None:
        raise ValueError("default_learning_rate(sub) takes no sizes: the subspace has them")
    if not groups:
        raise ValueError(
            "this subspace projects no leaf (direct training): there is no subspace default "
            "learning rate (the CLI trains directly at 1e-3)"
        )
    norms = [get_projection(g.projection).column_norm(g.size, g.dim) for g in groups]
    dims = [g.dim for g in groups]
    norm = float(np.exp(np.average(np.log(norms), weights=dims)))
    return float(base / norm * lr_dim_factor(sum(dims)))
