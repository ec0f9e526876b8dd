"""Flatten a parameter pytree into one vector and back, with per-leaf specs.

One utility serves the global and the per-leaf subspace schemes: a :class:`FlatSpec` records,
for every leaf of the tree, its path, shape, dtype and offset in the flat vector. The spec is
static (hashable), so it can live in the auxiliary data of a pytree and never enters a trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class LeafSpec(NamedTuple):
    """Where one leaf of a parameter tree lives in the flat vector.

    Attributes:
      path: the leaf's key path as a string, e.g. ``"params/Dense_0/kernel"``.
      shape: the leaf's shape.
      dtype: the leaf's dtype name (a string, so the spec is hashable).
      offset: index of the leaf's first element in the flat vector.
      size: number of elements, ``prod(shape)``.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    size: int


class FlatSpec(NamedTuple):
    """Static description of a flattened pytree: its treedef and one :class:`LeafSpec` a leaf."""

    treedef: Any
    leaves: tuple[LeafSpec, ...]

    @property
    def size(self) -> int:
        """Total number of elements D."""
        return sum(leaf.size for leaf in self.leaves)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(leaf.path for leaf in self.leaves)


def path_to_str(path: Sequence[Any]) -> str:
    """Turn a JAX key path into ``"a/b/c"`` (dict keys, attribute names and indices).

    These strings are a file and CLI contract: the leaf names in ``.npz`` checkpoints and the
    keys of ``dims=`` / ``labels=`` (``--dims``). ``tests/test_tree.py`` pins the format.
    """
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def leaf_specs(tree: PyTree) -> FlatSpec:
    """Compute the :class:`FlatSpec` of ``tree``.

    Raises:
      ValueError: if a leaf is not an array (e.g. a function or an equinox module's static
        field) or not floating point (only real floats can be trained).
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = []
    offset = 0
    for path, leaf in with_path:
        name = path_to_str(path)
        if not _is_array_like(leaf):
            raise ValueError(
                f"parameter leaf {name!r} is a {type(leaf).__name__}, not an array: pass only "
                "the arrays (equinox: params, static = eqx.partition(model, eqx.is_array), or "
                "eqx.filter(model, eqx.is_inexact_array); flax nnx: graphdef, state = "
                "nnx.split(model))"
            )
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"parameter leaf {name!r} has dtype {dtype}; only floating-point leaves can be "
                "projected or trained (pass non-float state separately, e.g. flax 'batch_stats')"
            )
        shape = tuple(int(s) for s in np.shape(leaf))
        size = math.prod(shape)
        specs.append(LeafSpec(name, shape, str(np.dtype(dtype)), offset, size))
        offset += size
    return FlatSpec(treedef, tuple(specs))


def _is_array_like(x: Any) -> bool:
    """An array, a ``jax.ShapeDtypeStruct`` or a number (not a function, a module, ...)."""
    if isinstance(x, (int, float, complex, np.generic)) and not isinstance(x, bool):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype")


def flatten(tree: PyTree) -> tuple[jax.Array, FlatSpec]:
    """Flatten ``tree`` into one vector.

    Args:
      tree: a pytree of floating-point arrays, e.g. Flax ``{'params': {...}}``.

    Returns:
      ``(flat, spec)`` with ``flat`` of shape ``(D,)`` in the leaves' common dtype.

    Example:
      >>> flat, spec = flatten({"a": jnp.ones((2, 3)), "b": jnp.zeros(4)})
      >>> flat.shape, spec.size
      ((10,), 10)
    """
    spec = leaf_specs(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.float32), spec
    # The leaves' common dtype by JAX's standard rules, cast explicitly (as strict mode wants).
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*leaves)
    flat = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
    return flat, spec


def unflatten(flat: jax.Array, spec: FlatSpec) -> PyTree:
    """Inverse of :func:`flatten`: split ``flat`` (shape ``(D,)``) back into the tree.

    Each leaf is cast back to its recorded dtype.
    """
    if flat.shape[-1] != spec.size:
        raise ValueError(f"flat vector has {flat.shape[-1]} elements, the spec needs {spec.size}")
    leaves = [
        flat[leaf.offset : leaf.offset + leaf.size].reshape(leaf.shape).astype(leaf.dtype)
        for leaf in spec.leaves
    ]
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def label_leaves(tree: PyTree, label_fn: Callable[[str, Any], str] | dict[str, str]) -> list[str]:
    """Label each leaf, in flatten order, like ``optax.multi_transform``'s labels.

    Args:
      tree: the parameter tree.
      label_fn: either ``fn(path_str, leaf) -> label`` or a mapping from path to label (paths
        not in the mapping get ``"project"``).

    Returns:
      One label a leaf, in :func:`flatten` order.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    labels = []
    for path, leaf in with_path:
        name = path_to_str(path)
        if callable(label_fn):
            labels.append(label_fn(name, leaf))
        else:
            labels.append(label_fn.get(name, "project"))
    return labels
