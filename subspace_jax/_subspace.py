"""``theta = theta0 + P w`` over any parameter pytree: global or per-leaf subspaces.

The subspace is a pytree (:class:`Subspace`) holding the frozen initialisation ``theta0`` and
the projection states; its static layout (which leaves are projected, frozen or trained
directly, and each group's sizes) sits in pytree auxiliary data, so it never enters a trace and
``jax.vmap`` over keys gives N independent subspaces in one batched pytree.

The trainable variables are a small dict ``{"w": (d,), "direct": (leaf, ...)}``: ``w`` is the
concatenation of every group's coordinates, ``direct`` the leaves trained directly (empty unless
some leaves are labelled ``"direct"``). Only they are differentiated and updated by optax.

SAID (structure-aware intrinsic dimension, Aghajanyan et al. 2021): with ``said=True`` each
projected leaf i gets one learned scale, ``theta_i = theta0_i + lambda_i * (P w)_i``, and the
trainable dict gains ``"said": (m,)`` (m = number of projected leaves, in flatten order),
initialised to ones as in the authors' code (zeros would be a saddle: with ``w = 0`` and
``lambda = 0`` both gradients vanish). The start point is ``theta0`` for any ``lambda`` since
``w = 0``. Dimension bookkeeping follows the paper, ``theta^{d-m}``: the requested ``dim`` counts
the m scales, so ``w`` has ``d - m`` entries; :attr:`Layout.dim` is the length of ``w`` and
:attr:`Layout.total_dim` (``= dim + m``) the number of trained scalars.

Example:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> model = nn.Dense(3)
  >>> theta0 = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> sub = init_subspace(jax.random.key(1), theta0, 5, projection="dense")
  >>> trainable = init_trainable(sub)
  >>> params = to_params(sub, trainable)  # == theta0 while w == 0
  >>> model.apply(params, jnp.ones((1, 4))).shape
  (1, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from subspace_jax._tree import FlatSpec, label_leaves, leaf_specs
from subspace_jax.projections import get_projection

PyTree = Any
LABELS = ("project", "frozen", "direct")


class Group(NamedTuple):
    """One projection: the leaves it covers and its sizes.

    Attributes:
      leaves: indices (in flatten order) of the leaves this group covers.
      size: D_g, their total number of elements.
      dim: d_g, the group's subspace dimension.
      offset: where the group's coordinates start in ``w``.
      projection: registry name of its projection.
    """

    leaves: tuple[int, ...]
    size: int
    dim: int
    offset: int
    projection: str


class Layout(NamedTuple):
    """Static description of a subspace (hashable).

    Attributes:
      spec: the flattened parameter tree's :class:`FlatSpec`.
      groups: one :class:`Group` per projection.
      labels: one label a leaf (``LABELS``).
      said: one learned scale per projected leaf (SAID); see the module docstring.
    """

    spec: FlatSpec
    groups: tuple[Group, ...]
    labels: tuple[str, ...]
    said: bool = False

    @property
    def dim(self) -> int:
        """Length of ``w``: the sum of the groups' dimensions (SAID scales not included)."""
        return sum(g.dim for g in self.groups)

    @property
    def said_leaves(self) -> tuple[int, ...]:
        """Leaves carrying a SAID scale, in flatten order (empty unless ``said``)."""
        if not self.said:
            return ()
        return tuple(i for g in self.groups for i in g.leaves)

    @property
    def num_scales(self) -> int:
        """Number m of SAID scales (0 unless ``said``)."""
        return len(self.said_leaves)

    @property
    def total_dim(self) -> int:
        """Number of trained subspace scalars: ``dim + num_scales`` (SAID's d)."""
        return self.dim + self.num_scales

    @property
    def num_params(self) -> int:
        """Total number of parameters D of the model."""
        return self.spec.size

    @property
    def direct_leaves(self) -> tuple[int, ...]:
        return tuple(i for i, lab in enumerate(self.labels) if lab == "direct")


@struct.dataclass
class Subspace:
    """A random subspace of a parameter tree.

    Attributes:
      theta0: the frozen initial parameters (the model's own initialisation).
      proj_states: one projection state per group.
      layout: static :class:`Layout`.
    """

    theta0: PyTree
    proj_states: tuple
    layout: Layout = struct.field(pytree_node=False)

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def num_params(self) -> int:
        return self.layout.num_params


def allocate_dims(sizes: list[int], dim: int) -> list[int]:
    """Split ``dim`` over groups in proportion to their sizes: ``1 <= d_i <= sizes[i]``.

    Each group gets 1, then the remaining ``dim - n`` are shared in proportion to the sizes by
    largest remainder. A group whose share would exceed its size is capped at its size and the
    rest is shared among the others again (water-filling), so ``--per-layer`` works up to
    ``dim = sum(sizes)``, where every group gets its full size.

    Raises:
      ValueError: if ``dim`` is smaller than the number of groups or larger than their total.
    """
    n = len(sizes)
    if dim < n:
        raise ValueError(
            f"per-leaf subspace needs d >= number of projected leaves ({n}), got {dim}"
        )
    if dim > sum(sizes):
        raise ValueError(
            f"per-leaf subspace needs d <= number of projected parameters ({sum(sizes)}), got {dim}"
        )
    alloc = [1] * n
    active = list(range(n))
    spare = dim - n
    while spare > 0:
        total = sum(sizes[i] for i in active)
        raw = {i: spare * sizes[i] / total for i in active}
        capped = [i for i in active if raw[i] >= sizes[i] - 1]
        if capped:  # full groups: give them their size, share the rest among the others
            for i in capped:
                spare -= sizes[i] - alloc[i]
                alloc[i] = sizes[i]
            active = [i for i in active if i not in capped]
            continue
        extra = {i: int(raw[i]) for i in active}
        order = sorted(active, key=lambda i: raw[i] - extra[i], reverse=True)
        for i in order[: spare - sum(extra.values())]:
            extra[i] += 1
        for i in active:
            alloc[i] += extra[i]
        break
    return alloc


def make_layout(
    theta0: PyTree,
    dim: int,
    *,
    projection: str = "dense",
    per_leaf: bool = False,
    dims: Mapping[str, int] | None = None,
    labels: Callable[[str, Any], str] | Mapping[str, str] | None = None,
    said: bool = False,
) -> Layout:
    """Compute the static layout of a subspace, validating every input.

    Arguments as for :func:`init_subspace`.
    """
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"dim must be an integer >= 0, got {dim!r}")
    if dim < 0:
        raise ValueError(f"dim must be >= 0 (0 = direct training), got {dim}")
    spec = leaf_specs(theta0)
    if not spec.leaves:
        raise ValueError("the parameter tree has no leaves")
    proj = get_projection(projection)
    if dim == 0 and dims is None:
        leaf_labels = ["direct"] * len(spec.leaves)
    elif labels is None:
        leaf_labels = ["project"] * len(spec.leaves)
    else:
        leaf_labels = label_leaves(theta0, labels)
    for leaf, lab in zip(spec.leaves, leaf_labels, strict=True):
        if lab not in LABELS:
            raise ValueError(f"leaf {leaf.path!r} has label {lab!r}; allowed: {', '.join(LABELS)}")
    projected = [i for i, lab in enumerate(leaf_labels) if lab == "project"]
    if said:
        if not projected:
            raise ValueError("said=True needs projected leaves (got dim = 0 or none labelled)")
        if dims is None:
            # The paper's convention: d counts the m scales, w gets the remaining d - m.
            m = len(projected)
            if dim <= m:
                raise ValueError(
                    f"SAID needs d > number of projected leaves (m = {m}): d counts the m "
                    f"scales and w gets d - m coordinates; got d = {dim}"
                )
            if per_leaf and dim - m < m:
                raise ValueError(
                    f"per-leaf SAID needs d >= 2 m = {2 * m} (m scales plus one coordinate "
                    f"of w per leaf), got d = {dim}"
                )
            dim = dim - m

    if dims is not None:
        per_leaf = True
        known = {spec.leaves[i].path for i in projected}
        unknown = set(dims) - {leaf.path for leaf in spec.leaves}
        if unknown:
            raise ValueError(
                f"dims names unknown leaves {sorted(unknown)}; leaves are {list(spec.paths)}"
            )
        missing = known - set(dims)
        if missing:
            raise ValueError(f"dims gives no dimension for projected leaves {sorted(missing)}")
        leaf_dims = [int(dims[spec.leaves[i].path]) for i in projected]
    elif per_leaf:
        leaf_dims = (
            allocate_dims([spec.leaves[i].size for i in projected], dim) if projected else []
        )
    if projected and not per_leaf and dim == 0:
        raise ValueError("dim must be >= 1 when some leaves are projected")

    groups = []
    offset = 0
    if per_leaf:
        for i, d_i in zip(projected, leaf_dims, strict=True):
            leaf = spec.leaves[i]
            _check_group_dim(proj, leaf.path, leaf.size, d_i)
            groups.append(Group((i,), leaf.size, d_i, offset, projection))
            offset += d_i
    elif projected:
        size = sum(spec.leaves[i].size for i in projected)
        _check_group_dim(proj, "all projected leaves", size, dim)
        groups.append(Group(tuple(projected), size, dim, 0, projection))
    return Layout(spec, tuple(groups), tuple(leaf_labels), bool(said))


def _check_group_dim(proj, what: str, size: int, d: int) -> None:
    hi = proj.max_dim(size)
    if not 1 <= d <= hi:
        raise ValueError(
            f"d = {d} is out of range for {what} (D = {size}) with projection "
            f"{proj.name!r}: allowed 1..{hi}"
        )


def init_subspace(
    key: jax.Array,
    theta0: PyTree,
    dim: int,
    *,
    projection: str = "dense",
    per_leaf: bool = False,
    dims: Mapping[str, int] | None = None,
    labels: Callable[[str, Any], str] | Mapping[str, str] | None = None,
    said: bool = False,
) -> Subspace:
    """Draw a random subspace through ``theta0``.

    Args:
      key: PRNG key for the projections (group g uses ``fold_in(key, g)``).
      theta0: the initial parameter pytree (floating-point leaves), e.g. ``model.init(...)``.
      dim: total subspace dimension d; ``0`` means direct training of every leaf.
      projection: registry name (see :func:`subspace_jax.projections.projection_names`).
      per_leaf: one projection per leaf, d split in proportion to leaf size (each >= 1).
      dims: explicit per-leaf dimensions ``{leaf_path: d_i}`` (implies ``per_leaf``).
      labels: ``fn(path, leaf) -> label`` or ``{path: label}`` with labels ``"project"``
        (default), ``"frozen"`` (kept at theta0) or ``"direct"`` (trained directly).
      said: SAID, one learned scale per projected leaf; ``dim`` then counts the scales
        (``w`` has ``dim - m`` entries; with explicit ``dims`` the scales come on top).

    Returns:
      A :class:`Subspace`. Works under ``jax.vmap`` over ``key`` (and ``theta0``).

    Raises:
      ValueError: bad dimensions, unknown projection or leaf names, non-float leaves.
    """
    layout = make_layout(
        theta0,
        dim,
        projection=projection,
        per_leaf=per_leaf,
        dims=dims,
        labels=labels,
        said=said,
    )
    return init_from_layout(key, theta0, layout)


def init_from_layout(key: jax.Array, theta0: PyTree, layout: Layout) -> Subspace:
    """Draw the projections of an already validated :class:`Layout`."""
    states = tuple(
        get_projection(g.projection).init(jax.random.fold_in(key, gi), g.size, g.dim)
        for gi, g in enumerate(layout.groups)
    )
    return Subspace(theta0=theta0, proj_states=states, layout=layout)


def init_trainable(sub: Subspace) -> dict:
    """The trainable variables at the start: ``{"w": zeros(d), "direct": (theta0 leaves...)}``.

    A SAID subspace adds ``"said": ones(m)``, one scale per projected leaf.
    For a batch of subspaces (vmapped over keys) use ``jax.vmap(init_trainable)(subs)``.
    """
    leaves = jax.tree_util.tree_leaves(sub.theta0)
    trainable = {
        "w": jnp.zeros((sub.layout.dim,), jnp.float32),
        "direct": tuple(leaves[i] for i in sub.layout.direct_leaves),
    }
    if sub.layout.said:
        trainable["said"] = jnp.ones((sub.layout.num_scales,), jnp.float32)
    return trainable


def to_params(sub: Subspace, trainable: dict | jax.Array) -> PyTree:
    """The full parameter tree ``theta0 + P w`` (pure, jittable, differentiable in ``trainable``).

    With SAID, leaf i is ``theta0_i + said[k_i] * (P w)_i`` (scales of one when ``trainable``
    is just ``w`` or lacks ``"said"``).

    Args:
      sub: the :class:`Subspace`.
      trainable: ``{"w": (d,), "direct": (...)}`` (plus ``"said": (m,)`` for SAID) from
        :func:`init_trainable`, or just ``w``.

    Returns:
      A pytree with the structure of ``theta0``.
    """
    layout = sub.layout
    if not isinstance(trainable, dict):
        trainable = {"w": trainable, "direct": ()}
    w = trainable["w"]
    if w.shape != (layout.dim,):
        raise ValueError(f"w must have shape ({layout.dim},), got {w.shape}")
    scales = trainable.get("said") if layout.said else None
    if scales is not None and scales.shape != (layout.num_scales,):
        raise ValueError(f"said must have shape ({layout.num_scales},), got {scales.shape}")
    scale_of = {leaf: k for k, leaf in enumerate(layout.said_leaves)}
    leaves = list(jax.tree_util.tree_leaves(sub.theta0))
    for g, state in zip(layout.groups, sub.proj_states, strict=True):
        proj = get_projection(g.projection)
        delta = proj.apply(state, w[g.offset : g.offset + g.dim])
        start = 0
        for i in g.leaves:
            spec = layout.spec.leaves[i]
            piece = delta[start : start + spec.size].reshape(spec.shape)
            if scales is not None:
                piece = scales[scale_of[i]] * piece
            leaves[i] = leaves[i] + piece.astype(leaves[i].dtype)
            start += spec.size
    direct = trainable.get("direct", ())
    for j, i in enumerate(layout.direct_leaves):
        leaves[i] = direct[j]
    return jax.tree_util.tree_unflatten(layout.spec.treedef, leaves)


class NonFiniteStateError(ValueError):
    """A subspace's theta0 or projection state holds a NaN or an infinity."""


def _finite_per_seed(tree: PyTree, batched: bool) -> jax.Array:
    """All-finite flag of every inexact leaf of ``tree``: ``(N,)`` if ``batched``, else ``()``."""
    flags = [
        jnp.isfinite(x).reshape((x.shape[0], -1) if batched else (1, -1)).all(axis=1)
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact) and x.size
    ]
    if not flags:
        return jnp.ones((), bool)
    return jnp.stack(flags).all(axis=0)


def check_finite(sub: Subspace, seeds=None) -> None:
    """Raise :class:`NonFiniteStateError` if theta0 or a projection state is not finite.

    A cheap guard (one pass over the arrays) for code that initialises subspaces outside
    traced code, so a broken initialisation is an error naming the projection, the seed and
    the sizes instead of a run whose loss is NaN from the first step.

    Args:
      sub: a :class:`Subspace`, or a batch of them (leading axis = seed) when ``seeds`` is
        given.
      seeds: the seeds of a batch, in order (their keys are ``jax.random.key(seed)``).
    """
    batched = seeds is not None
    parts = [("theta0 (the model's initial parameters)", sub.theta0)] + [
        (
            f"the {g.projection!r} projection state of group {gi} (D = {g.size:,}, d = {g.dim:,})",
            state,
        )
        for gi, (g, state) in enumerate(zip(sub.layout.groups, sub.proj_states, strict=True))
    ]
    for what, tree in parts:
        ok = jax.device_get(_finite_per_seed(tree, batched)).reshape(-1)
        if ok.all():
            continue
        who = ""
        if batched:
            bad = ", ".join(str(s) for s, good in zip(seeds, ok, strict=True) if not good)
            who = f" for seed(s) {bad} (key jax.random.key(seed))"
        raise NonFiniteStateError(
            f"non-finite values in {what}{who}, model D = {sub.layout.num_params:,}, "
            f"d = {sub.layout.dim:,}: the run would be NaN from the first step"
        )
