"""The jittable training and evaluation steps: optax sees only the subspace coordinates.

Both steps are pure functions of ``(sub, trainable, opt_state, x, y)``; the subspace (which
holds P) is an argument, never a closure, so a large P is not baked into the compiled program
as a constant. ``jax.vmap`` over the first three arguments trains several seeds in one program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from subspace_jax._subspace import Subspace, to_params

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. ``logits``: (B, C) float, ``labels``: (B,) int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def l2_penalty(params: PyTree) -> jax.Array:
    """``0.5 * ||theta||^2`` over every leaf."""
    return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))


def make_loss_fn(apply_fn: ApplyFn, l2: float = 0.0):
    """``loss(trainable, sub, x, y) -> (loss, accuracy)`` with optional L2 on theta."""

    def loss_fn(trainable, sub: Subspace, x, y):
        params = to_params(sub, trainable)
        logits = apply_fn(params, x)
        loss = cross_entropy(logits, y)
        if l2:
            loss = loss + l2 * l2_penalty(params)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return loss, acc

    return loss_fn


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, l2: float = 0.0):
    """Build ``step(sub, trainable, opt_state, x, y) -> (trainable, opt_state, loss, acc)``.

    Args:
      apply_fn: the model, ``apply(params, x) -> logits``.
      optimizer: an optax transformation; it is initialised on ``trainable`` only.
      l2: weight of ``0.5 * ||theta||^2`` added to the loss.

    Returns:
      A pure step; wrap it in ``jax.jit`` (and ``jax.vmap`` over seeds) yourself, or use
      :func:`compile_steps`.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(apply_fn, l2), has_aux=True)

    def step(sub, trainable, opt_state, x, y):
        (loss, acc), grads = grad_fn(trainable, sub, x, y)
        # optax's Adam computes decay ** count (float ** int32): only standard promotion allows it.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, loss, acc

    return step


def make_eval_step(apply_fn: ApplyFn):
    """Build ``eval(sub, trainable, x, y) -> (sum of losses, number correct)`` over a chunk."""

    def evaluate(sub, trainable, x, y):
        logits = apply_fn(to_params(sub, trainable), x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == y)

    return evaluate


def compile_steps(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, l2: float = 0.0):
    """Jitted, seed-vmapped ``(train_step, eval_step)``: leading axis = seed, data shared.

    ``train_step(subs, trainables, opt_states, x, y)`` with ``subs`` etc. batched over seeds and
    ``x, y`` one batch for all seeds; ``eval_step(subs, trainables, x, y)`` likewise. The
    trainable state and optimiser state are donated, so they are updated in place.
    """
    train = jax.vmap(make_train_step(apply_fn, optimizer, l2), in_axes=(0, 0, 0, None, None))
    evaluate = jax.vmap(make_eval_step(apply_fn), in_axes=(0, 0, None, None))
    return jax.jit(train, donate_argnums=(1, 2)), jax.jit(evaluate)
