"""``theta = theta0 + P w`` over any parameter pytree: global or per-leaf subspaces.

The subspace is a pytree (:class:`Subspace`) holding the frozen initialisation ``theta0`` and
the projection states; its static layout (which leaves are projected, frozen or trained
directly, and each group's sizes) sits in pytree auxiliary data, so it never enters a trace and
``jax.vmap`` over keys gives N independent subspaces in one batched pytree.

The trainable variables are a :class:`Trainable` (a NamedTuple of fixed structure, the same
fields for every layout): ``w`` (d,) the concatenation of every group's coordinates,
``direct`` the leaves trained directly (``()`` unless some leaves are labelled ``"direct"``) and
``scales`` the SAID scales (shape ``(0,)`` unless ``said=True``). Only they are differentiated
and updated by optax; :func:`init_trainable` copies the direct leaves, so they never alias
``theta0`` (a step may donate them).

Dtype policy (bf16 / f16 models): ``w`` and ``scales`` are float32 master copies, and so are
directly trained leaves narrower than float32 (``init_trainable(..., master_dtype=None)`` keeps
each leaf's own dtype). ``P w`` is computed in the projection state's dtype (float32) and
``theta0 + s * P w`` in the wider of the leaf's dtype and float32 (float32 for a bf16 leaf); the
sum is cast to the leaf's dtype once, at the end (one rounding). The model thus receives
parameters of its own dtype while updates smaller than a bf16 ulp accumulate in the float32 ``w``
(and master direct leaves) instead of being rounded away step by step. Float32 (and float64)
models are computed exactly as before.

Flax variables: given ``model.init(...)`` with collections besides ``"params"`` (e.g.
``{"params": ..., "batch_stats": ...}``), only ``"params"`` is projected (``collections=`` picks
others); the other collections are kept apart in :attr:`Subspace.other_collections`, never
projected or trained, and :func:`to_params` returns the full variables with them as given
(pass the updated ones, e.g. the ``batch_stats`` that ``model.apply(..., mutable=[...])``
returned, as its ``collections`` argument).

SAID (structure-aware intrinsic dimension, Aghajanyan et al. 2021): with ``said=True`` each
projected leaf i gets one learned scale, ``theta_i = theta0_i + lambda_i * (P w)_i``, and the
trainable's ``scales`` has shape ``(m,)`` (m = number of projected leaves, in flatten order),
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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import FrozenDict

from subspace_jax._tree import FlatSpec, label_leaves, leaf_specs
from subspace_jax.projections import Projection, get_projection

PyTree = Any
LABELS = ("project", "frozen", "direct")


class Group(NamedTuple):
    """One projection: the leaves it covers and its sizes.

    Attributes:
      leaves: indices (in flatten order) of the leaves this group covers.
      size: D_g, their total number of elements.
      dim: d_g, the group's subspace dimension.
      offset: where the group's coordinates start in ``w``.
      projection: registry name of its projection, or the :class:`Projection` itself when it
        was given as an object that is not the registered one of its name.
    """

    leaves: tuple[int, ...]
    size: int
    dim: int
    offset: int
    projection: str | Projection


class Layout(NamedTuple):
    """Static description of a subspace (hashable).

    Attributes:
      spec: the flattened parameter tree's :class:`FlatSpec`.
      groups: one :class:`Group` per projection.
      labels: one label a leaf (``LABELS``).
      said: one learned scale per projected leaf (SAID); see the module docstring.
      collections: the top-level collections (keys) of the variables that ``spec`` covers,
        in order, when the variables have others (kept in
        :attr:`Subspace.other_collections`); None when ``spec`` covers the whole tree.
    """

    spec: FlatSpec
    groups: tuple[Group, ...]
    labels: tuple[str, ...]
    said: bool = False
    collections: tuple[str, ...] | None = None

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
      theta0: the frozen initial parameters (the model's own initialisation); with Flax
        variables, the projected collections only (``{"params": ...}``).
      proj_states: one projection state per group.
      layout: static :class:`Layout`.
      other_collections: the variables' collections that are not projected (e.g.
        ``{"batch_stats": ...}``) as given at initialisation; empty for a plain parameter tree.
    """

    theta0: PyTree
    proj_states: tuple
    layout: Layout = struct.field(pytree_node=False)
    other_collections: dict = struct.field(default_factory=dict)

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


def split_collections(
    variables: PyTree, collections: str | Sequence[str] | None = "auto"
) -> tuple[PyTree, dict, tuple[str, ...] | None]:
    """Split Flax variables into the collections to project and the others.

    Args:
      variables: a parameter tree, or Flax variables ``{"params": ..., "batch_stats": ...}``.
      collections: the top-level keys to project; ``"auto"`` (default) means ``("params",)``
        when ``variables`` is a mapping with ``"params"`` and other keys, else the whole tree;
        None means the whole tree.

    Returns:
      ``(projected, others, names)``: the tree to project (with its top-level keys, so leaf
      paths stay ``"params/..."``), the other collections as a dict, and the projected
      collections' names (None when the whole tree is projected).

    Raises:
      ValueError: a named collection is not in ``variables``, or ``variables`` is not a
        mapping while collections are named.
    """
    if isinstance(collections, str) and collections == "auto":
        if not (isinstance(variables, Mapping) and "params" in variables and len(variables) > 1):
            return variables, {}, None
        collections = ("params",)
    if collections is None:
        return variables, {}, None
    names = (collections,) if isinstance(collections, str) else tuple(collections)
    if not isinstance(variables, Mapping):
        raise ValueError(
            f"collections={names!r} needs Flax variables (a mapping of collections), got "
            f"{type(variables).__name__}"
        )
    unknown = [n for n in names if n not in variables]
    if unknown or not names:
        raise ValueError(
            f"collections {unknown or list(names)!r} not in the variables; their collections "
            f"are {list(variables)}"
        )
    if set(names) == set(variables):
        return variables, {}, None
    projected = {k: v for k, v in variables.items() if k in names}
    others = {k: v for k, v in variables.items() if k not in names}
    if isinstance(variables, FrozenDict):
        projected = FrozenDict(projected)
    return projected, others, tuple(k for k in variables if k in names)


def _check_dim(dim: Any, dims: Mapping[str, Any] | None) -> int | None:
    """``dim`` as an int (None with ``dims``); exactly one of them must be given."""
    if dims is not None:
        if dim is not None:
            raise ValueError(
                f"pass either dim (the total d, split over leaves) or dims (d per leaf), not "
                f"both; got dim = {dim!r} and dims"
            )
        if not isinstance(dims, Mapping):
            raise ValueError(f"dims must be a mapping {{leaf_path: d}}, got {dims!r}")
        return None
    if dim is None:
        raise ValueError("give the subspace dimension dim (or per-leaf dims=...)")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ValueError(f"dim must be an integer >= 0, got {dim!r}")
    if dim < 0:
        raise ValueError(f"dim must be >= 0 (0 = direct training), got {dim}")
    return int(dim)


def _leaf_labels(
    theta0: PyTree,
    spec: FlatSpec,
    dim: int | None,
    labels: Callable[[str, Any], str] | Mapping[str, str] | None,
) -> list[str]:
    """One label a leaf (``LABELS``): all ``"direct"`` for ``dim = 0``, else from ``labels``."""
    if isinstance(labels, Mapping):
        unknown = set(labels) - set(spec.paths)
        if unknown:
            raise ValueError(
                f"labels names unknown leaves {sorted(unknown)}; leaves are {list(spec.paths)}"
            )
    elif labels is not None and not callable(labels):
        raise ValueError(
            f"labels must be a mapping {{path: label}} or fn(path, leaf), got {labels!r}"
        )
    if dim == 0:
        return ["direct"] * len(spec.leaves)
    if labels is None:
        return ["project"] * len(spec.leaves)
    leaf_labels = label_leaves(theta0, labels)
    for leaf, lab in zip(spec.leaves, leaf_labels, strict=True):
        if lab not in LABELS:
            raise ValueError(f"leaf {leaf.path!r} has label {lab!r}; allowed: {', '.join(LABELS)}")
    return leaf_labels


def _said_dim(dim: int | None, num_projected: int, per_leaf: bool) -> int | None:
    """The length of ``w`` under SAID: ``d - m`` (the paper's ``theta^{d-m}``)."""
    m = num_projected
    if not m:
        raise ValueError("said=True needs projected leaves (got dim = 0 or none labelled)")
    if dim is None:  # explicit dims: the scales come on top
        return None
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
    return dim - m


def _explicit_dims(spec: FlatSpec, projected: list[int], dims: Mapping[str, Any]) -> list[int]:
    """The per-leaf dimensions of ``dims``, checked: known paths, every projected leaf, ints."""
    unknown = set(dims) - set(spec.paths)
    if unknown:
        raise ValueError(
            f"dims names unknown leaves {sorted(unknown)}; leaves are {list(spec.paths)}"
        )
    missing = {spec.leaves[i].path for i in projected} - set(dims)
    if missing:
        raise ValueError(f"dims gives no dimension for projected leaves {sorted(missing)}")
    out = []
    for i in projected:
        path = spec.leaves[i].path
        d_i = dims[path]
        if isinstance(d_i, bool) or not isinstance(d_i, (int, np.integer)):
            raise ValueError(f"dims[{path!r}] must be an integer >= 1, got {d_i!r}")
        out.append(int(d_i))
    return out


def _leaf_dims(
    spec: FlatSpec,
    projected: list[int],
    dim: int | None,
    per_leaf: bool,
    dims: Mapping[str, Any] | None,
) -> list[int] | None:
    """Each projected leaf's d_i (explicit ``dims`` or ``dim`` split by size), None if global."""
    if dims is not None:
        return _explicit_dims(spec, projected, dims)
    if not per_leaf:
        return None
    return allocate_dims([spec.leaves[i].size for i in projected], dim) if projected else []


def _groups(
    spec: FlatSpec,
    projected: list[int],
    dim: int | None,
    leaf_dims: list[int] | None,
    projection: str | Projection,
) -> tuple[Group, ...]:
    """One group a leaf (``leaf_dims`` given) or one group over every projected leaf."""
    proj = get_projection(projection)
    name = _group_projection(projection)
    if not projected:
        return ()
    if leaf_dims is None:
        size = sum(spec.leaves[i].size for i in projected)
        _check_group_dim(proj, "all projected leaves", size, dim)
        return (Group(tuple(projected), size, dim, 0, name),)
    groups = []
    offset = 0
    for i, d_i in zip(projected, leaf_dims, strict=True):
        leaf = spec.leaves[i]
        _check_group_dim(proj, leaf.path, leaf.size, d_i)
        groups.append(Group((i,), leaf.size, d_i, offset, name))
        offset += d_i
    return tuple(groups)


def _group_projection(projection: str | Projection) -> str | Projection:
    """What a :class:`Group` records: the name, unless the object is not the registered one."""
    if isinstance(projection, str):
        return projection
    try:
        registered = get_projection(projection.name)
    except ValueError:
        return projection
    return projection.name if registered is projection else projection


def make_layout(
    theta0: PyTree,
    dim: int | None = None,
    *,
    projection: str | Projection = "dense",
    per_leaf: bool = False,
    dims: Mapping[str, int] | None = None,
    labels: Callable[[str, Any], str] | Mapping[str, str] | None = None,
    said: bool = False,
    collections: str | Sequence[str] | None = "auto",
) -> Layout:
    """Compute the static layout of a subspace, validating every input.

    Arguments as for :func:`init_subspace` (``theta0`` may hold ``jax.ShapeDtypeStruct``s).
    """
    dim = _check_dim(dim, dims)
    params, _, names = split_collections(theta0, collections)
    spec = leaf_specs(params)
    if not spec.leaves:
        raise ValueError("the parameter tree has no leaves")
    get_projection(projection)  # an unknown name fails here, before anything else
    leaf_labels = _leaf_labels(params, spec, dim, labels)
    projected = [i for i, lab in enumerate(leaf_labels) if lab == "project"]
    if dim and not projected:
        raise ValueError(f"dim = {dim} but no leaf is labelled 'project' (use dim = 0)")
    if said:
        dim = _said_dim(dim, len(projected), per_leaf)
    leaf_dims = _leaf_dims(spec, projected, dim, per_leaf, dims)
    groups = _groups(spec, projected, dim, leaf_dims, projection)
    return Layout(spec, groups, tuple(leaf_labels), bool(said), names)


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
    dim: int | None = None,
    *,
    projection: str | Projection = "dense",
    per_leaf: bool = False,
    dims: Mapping[str, int] | None = None,
    labels: Callable[[str, Any], str] | Mapping[str, str] | None = None,
    said: bool = False,
    collections: str | Sequence[str] | None = "auto",
) -> Subspace:
    """Draw a random subspace through ``theta0``.

    Args:
      key: PRNG key for the projections (group g uses ``fold_in(key, g)``).
      theta0: the initial parameters, e.g. ``model.init(...)``: a pytree of floating-point
        arrays, or Flax variables with other collections (see ``collections``). Leaves must be
        arrays: partition an equinox module first (``eqx.partition(model, eqx.is_array)``), and
        pass the ``state`` of ``nnx.split(model)`` for flax nnx.
      dim: total subspace dimension d; ``0`` means direct training of every leaf. Give either
        ``dim`` or ``dims``.
      projection: a registry name (see :func:`subspace_jax.projections.projection_names`) or
        a :class:`~subspace_jax.projections.Projection` (e.g. ``fastfood(shared_signs=False)``
        or one from :func:`~subspace_jax.projections.make_projection`).
      per_leaf: one projection per leaf, d split in proportion to leaf size (each >= 1).
      dims: explicit per-leaf dimensions ``{leaf_path: d_i}`` (implies ``per_leaf``; every
        projected leaf needs one).
      labels: ``fn(path, leaf) -> label`` or ``{path: label}`` with labels ``"project"``
        (default), ``"frozen"`` (kept at theta0) or ``"direct"`` (trained directly); a
        mapping's paths must be leaves of ``theta0``.
      said: SAID, one learned scale per projected leaf; ``dim`` then counts the scales
        (``w`` has ``dim - m`` entries; with explicit ``dims`` the scales come on top).
      collections: which top-level collections of Flax variables to project. ``"auto"``
        (default): ``"params"`` when the variables have other collections (``batch_stats``,
        ``cache``, ...), which then pass through :func:`to_params` untouched; None: the whole
        tree.

    Returns:
      A :class:`Subspace`. Works under ``jax.vmap`` over ``key`` (and ``theta0``).

    Raises:
      ValueError: bad dimensions, unknown projection, leaf or collection names, non-float or
        non-array leaves, ``dim`` together with ``dims``.
    """
    layout = make_layout(
        theta0,
        dim,
        projection=projection,
        per_leaf=per_leaf,
        dims=dims,
        labels=labels,
        said=said,
        collections=collections,
    )
    return init_from_layout(key, theta0, layout)


def init_from_layout(key: jax.Array, theta0: PyTree, layout: Layout) -> Subspace:
    """Draw the projections of an already validated :class:`Layout`."""
    if layout.collections is None:
        params, others = theta0, {}
    else:
        params, others, _ = split_collections(theta0, layout.collections)
    states = tuple(
        get_projection(g.projection).init(jax.random.fold_in(key, gi), g.size, g.dim)
        for gi, g in enumerate(layout.groups)
    )
    return Subspace(theta0=params, proj_states=states, layout=layout, other_collections=others)


class Trainable(NamedTuple):
    """The trainable variables of a subspace: what optax initialises, differentiates and updates.

    The structure is the same for every layout (no option adds or removes a field); only the
    number of ``direct`` leaves and the lengths follow the layout.

    Attributes:
      w: ``(d,)`` float32, the subspace coordinates (every group's, concatenated; zeros at the
        start, so ``to_params`` gives ``theta0``).
      direct: the directly trained leaves (label ``"direct"``, or every leaf when ``dim = 0``),
        in flatten order, each of its leaf's shape; ``()`` when there are none.
      scales: ``(m,)`` float32 SAID scales, one per projected leaf (ones at the start); shape
        ``(0,)`` unless the layout is SAID. None (``Trainable(w)``) means scales of one.
    """

    w: jax.Array
    direct: tuple = ()
    scales: jax.Array | None = None


def init_trainable(sub: Subspace, *, master_dtype: Any = jnp.float32) -> Trainable:
    """The trainable variables at the start: ``Trainable(w=zeros(d), direct=copies, scales)``.

    The directly trained leaves are fresh copies of theta0's (never aliases: a jitted step may
    donate them while ``sub`` is still used). A leaf narrower than ``master_dtype`` (bf16,
    f16) is copied as ``master_dtype`` (the float32 master copy, cast back to the leaf's dtype
    by :func:`to_params`); ``master_dtype=None`` keeps every leaf's own dtype.

    For a batch of subspaces (vmapped over keys) use ``jax.vmap(init_trainable)(subs)``.

    Args:
      sub: the :class:`Subspace`.
      master_dtype: the least precision of the directly trained leaves (default float32).

    Returns:
      A :class:`Trainable`: ``w`` ``(d,)`` zeros, ``direct`` the copies, ``scales`` ``(m,)``
      ones for SAID (else ``(0,)``), all float32 but the direct leaves.
    """
    leaves = jax.tree_util.tree_leaves(sub.theta0)

    def copy(x):
        dtype = x.dtype if master_dtype is None else _wider(x.dtype, master_dtype)
        return jnp.array(x, dtype=dtype, copy=True)

    return Trainable(
        w=jnp.zeros((sub.layout.dim,), jnp.float32),
        direct=tuple(copy(leaves[i]) for i in sub.layout.direct_leaves),
        scales=jnp.ones((sub.layout.num_scales,), jnp.float32),
    )


def _check_float(what: str, x: Any, shape: tuple[int, ...]) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{what} must be an array of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what} must be floating point, got dtype {x.dtype}")


_LEGACY_KEYS = {"w": "w", "direct": "direct", "said": "scales", "scales": "scales"}


def as_trainable(layout: Layout, trainable: Any) -> Trainable:
    """``trainable`` as a :class:`Trainable`, its structure, shapes and dtypes checked.

    Accepts a ``Trainable``, just ``w`` (no direct leaves; SAID scales of one) or the dict
    ``{"w", "direct", "said"}`` of earlier versions.

    Raises:
      ValueError: naming the bad field, its shape or dtype and the expected one.
    """
    if isinstance(trainable, Mapping):
        unknown = set(trainable) - set(_LEGACY_KEYS)
        if unknown or "w" not in trainable:
            raise ValueError(
                "trainable must be a Trainable(w, direct, scales) from init_trainable (or w "
                f"alone); got a dict with keys {sorted(trainable)}"
            )
        trainable = Trainable(**{_LEGACY_KEYS[k]: v for k, v in trainable.items()})
    elif not isinstance(trainable, Trainable):
        if isinstance(trainable, tuple):
            raise ValueError(
                f"trainable must be a Trainable(w, direct, scales) from init_trainable (or w "
                f"alone), got a {type(trainable).__name__} of {len(trainable)} items"
            )
        trainable = Trainable(w=trainable)
    _check_float("w", trainable.w, (layout.dim,))
    if trainable.scales is not None:
        _check_float("scales (SAID)", trainable.scales, (layout.num_scales,))
    direct = trainable.direct
    want = layout.direct_leaves
    if not isinstance(direct, (tuple, list)) or len(direct) != len(want):
        n = len(direct) if isinstance(direct, (tuple, list)) else type(direct).__name__
        raise ValueError(
            f"trainable.direct must be a tuple of the {len(want)} directly trained leaves "
            f"(from init_trainable), got {n}"
        )
    for x, i in zip(direct, want, strict=True):
        leaf = layout.spec.leaves[i]
        _check_float(f"direct leaf {leaf.path!r}", x, leaf.shape)
    return trainable


def to_params(
    sub: Subspace,
    trainable: Trainable | jax.Array,
    collections: Mapping[str, PyTree] | None = None,
) -> PyTree:
    """The full parameter tree ``theta0 + P w`` (pure, jittable, differentiable in ``trainable``).

    With SAID, leaf i is ``theta0_i + scales[k_i] * (P w)_i`` (scales of one when ``trainable``
    is just ``w``). Each projected leaf is computed in the wider of its dtype and float32 and
    cast to the leaf's dtype at the end; direct leaves are cast to their leaf's dtype (see the
    module docstring's dtype policy).

    Args:
      sub: the :class:`Subspace`.
      trainable: the :class:`Trainable` of :func:`init_trainable` (or just ``w``). Its
        structure, shapes and dtypes (floating) are checked (:func:`as_trainable`).
      collections: for Flax variables with collections that are not projected, their current
        values (e.g. ``{"batch_stats": new_stats}`` as ``model.apply(..., mutable=...)``
        returned them); the ones not given are those of :attr:`Subspace.other_collections`.

    Returns:
      A pytree with the structure of ``theta0``, or the full Flax variables (projected and
      other collections) when ``theta0`` had other collections.

    Raises:
      ValueError: a trainable of the wrong structure, shape or dtype; ``collections`` naming a
        collection that is projected or unknown.
    """
    layout = sub.layout
    trainable = as_trainable(layout, trainable)
    w = trainable.w
    scales = trainable.scales if layout.said else None
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
            leaves[i] = _add_in_wide(leaves[i], piece)
            start += spec.size
    for j, i in enumerate(layout.direct_leaves):
        leaves[i] = trainable.direct[j].astype(layout.spec.leaves[i].dtype)
    params = jax.tree_util.tree_unflatten(layout.spec.treedef, leaves)
    return _with_other_collections(sub, params, collections)


def _wider(a: Any, b: Any) -> np.dtype:
    """The wider of two float dtypes (float32 for two different ones of one width, e.g. bf16
    and f16); unlike ``jnp.promote_types`` it holds under strict dtype promotion."""
    a, b = np.dtype(a), np.dtype(b)
    if a == b:
        return a
    if a.itemsize == b.itemsize:
        return np.dtype(np.float32)
    return a if a.itemsize > b.itemsize else b


def _add_in_wide(theta0: jax.Array, piece: jax.Array) -> jax.Array:
    """``theta0 + piece`` in the wider dtype (float32 for bf16 + float32), cast back to
    theta0's dtype once (for float32 leaves exactly ``theta0 + piece``)."""
    wide = _wider(theta0.dtype, piece.dtype)
    return (theta0.astype(wide) + piece.astype(wide)).astype(theta0.dtype)


def _with_other_collections(
    sub: Subspace, params: PyTree, collections: Mapping[str, PyTree] | None
) -> PyTree:
    others = dict(sub.other_collections)
    if collections:
        unknown = set(collections) - set(others)
        if unknown:
            raise ValueError(
                f"collections {sorted(unknown)} are not pass-through collections of this "
                f"subspace; those are {sorted(others)} (the projected ones come from trainable)"
            )
        others.update(collections)
    if not others:
        return params
    merged = {**params, **others}
    return FrozenDict(merged) if isinstance(params, FrozenDict) else merged


class NonFiniteStateError(ValueError):
    """A subspace's theta0 or projection state holds a NaN or an infinity."""


def all_finite(tree: PyTree) -> jax.Array:
    """Boolean scalar: every floating-point entry of ``tree`` is finite (integer leaves pass)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _finite_per_seed(tree: PyTree, batched: bool) -> jax.Array:
    """All-finite flag of every inexact leaf of ``tree``: ``(N,)`` if ``batched``, else ``()``."""
    if not batched:
        return all_finite(tree)
    flags = [
        jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
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
            f"the {getattr(g.projection, 'name', g.projection)!r} projection state of group "
            f"{gi} (D = {g.size:,}, d = {g.dim:,})",
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
