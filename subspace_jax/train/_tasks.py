"""Fine-tuning pieces of a run: a re-initialised classifier trained directly beside the
subspace (``reinit_head``), its optimiser, and a checkpoint loaded without its head.

The subspace's dimension d counts only the projected parameters: the head's leaves are
labelled ``"direct"`` in the layout (``subspace_jax.make_layout(labels=...)``), so they are
trained as themselves, at the direct learning rate, as in the fine-tuning literature
(Aghajanyan et al. 2021 train the classifier of a new task directly).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_jax._checkpoint import _read_leaves, _suffix, leaf_mismatches
from subspace_jax._errors import UserError
from subspace_jax._subspace import Trainable, to_params
from subspace_jax._tree import path_to_str
from subspace_jax.train._step import split_state

PyTree = Any


def in_head(head: str) -> Callable[[str], bool]:
    """``fn(path) -> bool``: the leaf path lies in the classifier layer ``head``."""
    return lambda path: path == head or path.startswith(head + "/")


def head_labels(head: str) -> Callable[[str, Any], str]:
    """Layout labels: the classifier's leaves ``"direct"``, every other leaf ``"project"``."""
    inside = in_head(head)
    return lambda path, leaf: "direct" if inside(path) else "project"


def with_direct_lr(
    make: Callable[[str, float], optax.GradientTransformation],
    name: str,
    lr: float,
    direct_lr: float,
) -> optax.GradientTransformation:
    """``make(name, lr)`` for the subspace coordinates, ``make(name, direct_lr)`` for the
    directly trained leaves (the :class:`~subspace_jax.Trainable`'s ``direct``)."""

    def labels(trainable: Trainable) -> Trainable:
        return Trainable(
            w="subspace",
            direct=tuple("direct" for _ in trainable.direct),
            scales=None if trainable.scales is None else "subspace",
        )

    return optax.multi_transform(
        {"subspace": make(name, lr), "direct": make(name, direct_lr)}, labels
    )


def checkpoint_without_head(path: str, model) -> Callable[[jax.Array], PyTree]:
    """``key -> variables``: the checkpoint at ``path`` with the classifier drawn afresh.

    Every leaf outside ``model.head`` comes from the file (checked against the model: missing
    leaves and wrong shapes are errors); the head's leaves come from ``model.init(key)``, so
    each seed gets its own random head, and the file's head may have another number of
    classes (or be absent).

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: an unknown suffix, an unreadable file, or leaves outside the head that do not
        match the model, naming them.
    """
    file = Path(path)
    suffix = _suffix(file)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    stored = _read_leaves(file, suffix)
    inside = in_head(model.head)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = [path_to_str(p) for p, _ in with_path]
    wanted = {n: leaf for n, (_, leaf) in zip(names, with_path, strict=True) if not inside(n)}
    parts = leaf_mismatches(stored, wanted, ignore=inside)
    if parts:
        raise UserError(
            f"checkpoint {str(path)!r} does not match the model outside its classifier "
            f"{model.head!r}: {', '.join(parts)}"
        )
    loaded = {n: jnp.asarray(np.asarray(stored[n]), dtype=leaf.dtype) for n, leaf in wanted.items()}

    def init(key: jax.Array) -> PyTree:
        fresh = jax.tree_util.tree_leaves(model.init(key))
        leaves = [loaded[n] if n in loaded else x for n, x in zip(names, fresh, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return init


def model_init_with_fresh_head(init: Callable, model) -> Callable[[jax.Array], PyTree]:
    """``key -> variables`` from ``init`` (e.g. a checkpoint that ignores its key) with the
    classifier's leaves taken from ``model.init(key)``."""
    inside = in_head(model.head)

    def fresh_head(key: jax.Array) -> PyTree:
        base = init(key)
        new = model.init(key)
        with_path, treedef = jax.tree_util.tree_flatten_with_path(base)
        leaves = [
            b if not inside(path_to_str(p)) else n
            for (p, b), n in zip(with_path, jax.tree_util.tree_leaves(new), strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return fresh_head


def first_seed_variables(trained) -> PyTree:
    """The full variables of the first seed of a run: ``theta0 + P w`` (with its directly
    trained leaves) and the model's state (BatchNorm statistics), on the host.

    Args:
      trained: the :class:`~subspace_jax.train.Trained` of ``train_and_evaluate`` (its
        ``TrainOutput.trained``; leading axis = seed).

    Returns:
      The variables ``model.init`` gives (``{"params": ..., "batch_stats": ...}``), a
      checkpoint for ``TrainConfig.theta0_path`` / ``--theta0``.
    """
    sub = jax.tree_util.tree_map(lambda a: a[0], trained.subs)
    trainable = jax.tree_util.tree_map(lambda a: a[0], trained.trainables)
    inner, state = split_state(trainable)
    return jax.device_get(to_params(sub, inner, state))
