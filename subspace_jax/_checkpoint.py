"""Parameter-tree checkpoints: save a Flax parameter pytree and load it back against a model.

Two formats, chosen by the file's suffix:

* ``.msgpack``: ``flax.serialization.to_bytes(params)``, read back with
  ``flax.serialization.msgpack_restore`` and matched leaf by leaf to the model's tree.
* ``.npz``: one array per leaf, named by its key path (``"params/Dense_0/kernel"``), written by
  :func:`save_params` or by hand with ``np.savez(path, **{path: array})``.

Loading checks the file against the model's parameter tree (``jax.eval_shape(model.init)``):
a missing or unexpected leaf, or a leaf with the wrong shape, is a ``ValueError`` naming it.
Plain numpy and flax serialization: no training code is imported.

Example:
  >>> save_params("theta.npz", params)
  >>> theta0 = load_params("theta.npz", jax.eval_shape(model.init, jax.random.key(0)))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from subspace_jax._errors import UserError
from subspace_jax._results import atomic_write
from subspace_jax._tree import path_to_str

PyTree = Any
SUFFIXES = (".msgpack", ".npz")


def _suffix(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(
            f"checkpoint {str(path)!r} has suffix {suffix!r}; allowed: {', '.join(SUFFIXES)}"
        )
    return suffix


def save_params(path: str | Path, params: PyTree) -> Path:
    """Write a parameter pytree to ``path`` (``.msgpack`` or ``.npz``, by suffix).

    Args:
      path: output file; its suffix picks the format.
      params: a pytree of arrays, e.g. Flax ``{"params": {...}}``.

    Returns:
      The path written (atomically: a temporary file beside it, renamed when complete).
    """
    path = Path(path)
    suffix = _suffix(path)
    params = jax.device_get(params)
    with atomic_write(path, "wb") as f:  # never a partly written checkpoint at ``path``
        if suffix == ".msgpack":
            f.write(serialization.to_bytes(params))
        else:
            with_path, _ = jax.tree_util.tree_flatten_with_path(params)
            np.savez(f, **{path_to_str(p): np.asarray(leaf) for p, leaf in with_path})
    return path


def _read_leaves(path: Path, suffix: str) -> dict[str, np.ndarray]:
    """The file's leaves by key path."""
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {str(path)!r} as an .npz checkpoint: {e}") from None
    try:
        state = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises its own exception types
        raise UserError(f"cannot read {str(path)!r} as a msgpack checkpoint: {e}") from None
    with_path, _ = jax.tree_util.tree_flatten_with_path(state)
    return {path_to_str(p): np.asarray(leaf) for p, leaf in with_path}


def leaf_mismatches(stored: dict, wanted: dict, ignore=lambda name: False) -> list[str]:
    """How the leaves read from a file (``name -> array``) differ from the model's (``name ->
    shape-bearing leaf``): missing, unexpected (unless ``ignore(name)``) and wrongly shaped
    leaves, one phrase each; empty when they match."""
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(n for n in set(stored) - set(wanted) if not ignore(n))
    bad = [
        f"{n}: file {tuple(stored[n].shape)}, model {tuple(wanted[n].shape)}"
        for n in wanted
        if n in stored and tuple(stored[n].shape) != tuple(wanted[n].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing leaves {missing}")
    if extra:
        parts.append(f"unexpected leaves {extra}")
    if bad:
        parts.append(f"wrong shapes ({'; '.join(bad)})")
    return parts


def load_params(path: str | Path, target: PyTree) -> PyTree:
    """Load a checkpoint and match it to the model's parameter tree.

    Args:
      path: a ``.msgpack`` or ``.npz`` file (see the module docstring).
      target: the model's parameter tree or its shapes, e.g.
        ``jax.eval_shape(model.init, jax.random.key(0))``; it gives the structure, the shapes
        and the dtypes (leaves are cast to the target's dtype).

    Returns:
      A pytree with ``target``'s structure holding the checkpoint's arrays.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: unknown suffix, unreadable file, or a tree that does not match the model
        (missing or unexpected leaves, wrong shapes), naming the leaves.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    stored = _read_leaves(path, suffix)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(target)
    wanted = {path_to_str(p): leaf for p, leaf in with_path}
    parts = leaf_mismatches(stored, wanted)
    if parts:
        raise UserError(
            f"checkpoint {str(path)!r} does not match the model's parameter tree: "
            f"{', '.join(parts)}"
        )
    leaves = []
    for name, (_, leaf) in zip(wanted, with_path, strict=True):
        arr = stored[name]
        if not np.issubdtype(arr.dtype, np.floating):
            raise UserError(f"checkpoint leaf {name!r} has dtype {arr.dtype}; expected floats")
        leaves.append(jnp.asarray(arr, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
