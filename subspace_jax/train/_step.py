"""The jittable training and evaluation steps: optax sees only the subspace coordinates.

Both steps are pure functions of ``(sub, trainable, opt_state, x, y)``; the subspace (which
holds P) is an argument, never a closure, so a large P is not baked into the compiled program
as a constant. ``jax.vmap`` over the first three arguments trains several seeds in one program.

Model state (BatchNorm statistics): a model with mutable collections trains with the
:class:`TrainVars` of :func:`init_train_vars`, ``TrainVars(trainable, state)``: the
:class:`~subspace_jax.Trainable` that optax initialises and updates, and beside it the state
(``{"batch_stats": ...}``), which optax never sees (the optimiser is initialised on
``vars.trainable`` only) and which is never projected. The step then runs the model in
training mode (``apply_fn(variables, x, train=True) -> (logits, updates)``: batch statistics,
the running statistics updated) and replaces the state by the updates; evaluation uses the
running statistics (``apply_fn(variables, x)``). A model without state trains with the plain
``Trainable`` exactly as before.

:func:`guard_finite` wraps a training step so that a run whose loss or state becomes
non-finite stops updating and records the step (like ``optax.apply_if_finite``, but for good):
the record stays on the device, so guarding adds no host synchronisation to a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse

from subspace_jax._subspace import Subspace, Trainable, all_finite, init_trainable, to_params

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


class TrainVars(NamedTuple):
    """What a model with state (BatchNorm statistics) carries through training.

    Attributes:
      trainable: the :class:`~subspace_jax.Trainable` (what optax initialises and updates).
      state: the model's other collections, e.g. ``{"batch_stats": ...}``: replaced by the
        model's own updates at each step, never seen by the optimiser, never projected.
    """

    trainable: Trainable
    state: dict


def init_train_vars(sub: Subspace) -> Trainable | TrainVars:
    """:func:`~subspace_jax.init_trainable`, with the model's state when it has any.

    Returns:
      ``init_trainable(sub)`` when the subspace's variables have no collections besides the
      projected ones; else ``TrainVars(init_trainable(sub), state)``, ``state`` a copy of
      ``sub.other_collections`` (e.g. ``{"batch_stats": ...}``; a copy: the step donates it).
      Vmap it over a batch of subspaces like ``init_trainable``.
    """
    trainable = init_trainable(sub)
    if not sub.other_collections:
        return trainable
    state = jax.tree_util.tree_map(jnp.copy, dict(sub.other_collections))
    return TrainVars(trainable, state)


def split_state(train_vars) -> tuple[Any, dict | None]:
    """``(trainable, state)`` of a :class:`TrainVars`; ``(train_vars, None)`` otherwise."""
    if isinstance(train_vars, TrainVars):
        return train_vars.trainable, train_vars.state
    return train_vars, None


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


def _make_state_loss_fn(apply_fn: ApplyFn, l2: float = 0.0):
    """``loss(trainable, sub, state, x, y) -> (loss, (accuracy, new state))``, training mode."""

    def loss_fn(trainable, sub: Subspace, state, x, y):
        variables = to_params(sub, trainable, state)
        logits, updates = apply_fn(variables, x, train=True)
        loss = cross_entropy(logits, y)
        if l2:
            loss = loss + l2 * l2_penalty({k: v for k, v in variables.items() if k not in state})
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return loss, (acc, {k: dict(updates[k]) for k in state})

    return loss_fn


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, l2: float = 0.0):
    """Build ``step(sub, trainable, opt_state, x, y) -> (trainable, opt_state, loss, acc)``.

    Args:
      apply_fn: the model, ``apply(params, x) -> logits``.
      optimizer: an optax transformation; it is initialised on ``trainable`` only.
      l2: weight of ``0.5 * ||theta||^2`` added to the loss.

    ``trainable`` is a :class:`~subspace_jax.Trainable`, or for a model with state a
    :class:`TrainVars` (``opt_state`` then from ``optimizer.init(vars.trainable)``): the step
    runs the model in training mode and returns the updated state in the new ``TrainVars``.

    Returns:
      A pure step; wrap it in ``jax.jit`` (and ``jax.vmap`` over seeds) yourself, or use
      :func:`compile_steps`.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(apply_fn, l2), has_aux=True)
    state_grad_fn = jax.value_and_grad(_make_state_loss_fn(apply_fn, l2), has_aux=True)

    def step(sub, trainable, opt_state, x, y):
        if isinstance(trainable, TrainVars):
            return state_step(sub, trainable, opt_state, x, y)
        (loss, acc), grads = grad_fn(trainable, sub, x, y)
        # optax's Adam computes decay ** count (float ** int32): only standard promotion allows it.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, loss, acc

    def state_step(sub, train_vars: TrainVars, opt_state, x, y):
        inner, state = train_vars
        (loss, (acc, new_state)), grads = state_grad_fn(inner, sub, state, x, y)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, inner)
        # The statistics are not trained: the model's own update replaces them.
        return TrainVars(optax.apply_updates(inner, updates), new_state), opt_state, loss, acc

    return step


class Divergence(NamedTuple):
    """A run's divergence record, carried through the guarded step (on the device).

    Attributes:
      steps: int32 scalar, the optimiser steps attempted so far.
      at: int32 scalar, the 1-based number of the first step whose loss or new trainable was
        non-finite (the run's state is that after step ``at - 1``); 0 while finite.
    """

    steps: jax.Array
    at: jax.Array


def init_divergence() -> Divergence:
    """The record of a run that has taken no step. Batch it over seeds with ``jax.vmap``."""
    zero = jnp.zeros((), jnp.int32)
    return Divergence(steps=zero, at=zero)


def guard_finite(step):
    """Make a training step stop a run for good at its first non-finite loss or trainable.

    Args:
      step: ``step(sub, trainable, opt_state, x, y) -> (trainable, opt_state, loss, acc)``,
        e.g. from :func:`make_train_step`.

    Returns:
      ``guarded(sub, trainable, opt_state, div, x, y) -> (trainable, opt_state, div, loss, acc)``
      with ``div`` a :class:`Divergence`. While the loss and the new trainable are finite it
      returns ``step``'s values unchanged (bit for bit); at the first step where either is
      not, it records the step in ``div.at`` and from then on returns the trainable and
      optimiser state of the last finite step (a select, no branch: it vmaps over seeds, one
      flag per seed). The loss and accuracy are those computed at the state passed in.

      The optimiser state is kept with the trainable but not checked itself: a non-finite
      state reaches the trainable at the next update, and checking Adam's two moment vectors
      made a directly trained MLP's step about 20% slower.

    Example:
      >>> guarded = jax.jit(guard_finite(make_train_step(model.apply, optax.sgd(0.1))))
      >>> t, o, div, loss, acc = guarded(sub, t, o, init_divergence(), x, y)
      >>> int(div.at)  # 0: finite so far
    """

    def guarded(sub, trainable, opt_state, div: Divergence, x, y):
        new_trainable, new_opt_state, loss, acc = step(sub, trainable, opt_state, x, y)
        finite = jnp.isfinite(loss) & all_finite(new_trainable)
        live = div.at == 0
        update = live & finite

        def keep(new, old):
            return jnp.where(update, new, old)

        trainable = jax.tree_util.tree_map(keep, new_trainable, trainable)
        opt_state = jax.tree_util.tree_map(keep, new_opt_state, opt_state)
        steps = div.steps + 1
        at = jnp.where(live & ~finite, steps, div.at)
        return trainable, opt_state, Divergence(steps=steps, at=at), loss, acc

    return guarded


def make_eval_step(apply_fn: ApplyFn):
    """Build ``eval(sub, trainable, x, y) -> (sum of losses, number correct)`` over a chunk.

    ``trainable`` may be a :class:`TrainVars`: its state (running BatchNorm statistics) is
    used as is.
    """

    def evaluate(sub, trainable, x, y):
        trainable, state = split_state(trainable)
        logits = apply_fn(to_params(sub, trainable, state), x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == y)

    return evaluate


def compile_steps(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    l2: float = 0.0,
    *,
    guard: bool = False,
):
    """Jitted, seed-vmapped ``(train_step, eval_step)``: leading axis = seed, data shared.

    ``train_step(subs, trainables, opt_states, x, y)`` with ``subs`` etc. batched over seeds and
    ``x, y`` one batch for all seeds; ``eval_step(subs, trainables, x, y)`` likewise. The
    trainable state and optimiser state are donated, so they are updated in place.

    With ``guard=True`` the train step is :func:`guard_finite`'s,
    ``train_step(subs, trainables, opt_states, divs, x, y) -> (trainables, opt_states, divs,
    loss, acc)``, with ``divs`` a :class:`Divergence` batched over seeds (also donated).
    """
    step = make_train_step(apply_fn, optimizer, l2)
    if guard:
        train = jax.vmap(guard_finite(step), in_axes=(0, 0, 0, 0, None, None))
        donate = (1, 2, 3)
    else:
        train = jax.vmap(step, in_axes=(0, 0, 0, None, None))
        donate = (1, 2)
    evaluate = jax.vmap(make_eval_step(apply_fn), in_axes=(0, 0, None, None))
    return jax.jit(train, donate_argnums=donate), jax.jit(evaluate)


#: :func:`over_seeds` unrolls at most this many seeds (beyond, compiling N copies costs more).
MAX_UNROLLED_SEEDS = 8


def over_seeds(fn, in_axes: tuple, unroll: bool = False):
    """``fn`` mapped over the leading (seed) axis of the arguments whose ``in_axes`` is 0.

    ``jax.vmap(fn, in_axes)``, or with ``unroll=True`` the same function traced once per seed
    and stacked: one program with ``N`` copies of ``fn``. Unrolling is what XLA:CPU needs for
    convolutions: a vmapped convolution's kernel gains a batch axis and becomes a grouped
    convolution, which XLA:CPU runs about 4x slower than the ``N`` plain ones (ResNet-20,
    three seeds, batch 32: 2.5 s against 0.56 s a step on this project's CPU). Compilation
    grows with ``N``, so above ``MAX_UNROLLED_SEEDS`` seeds it vmaps all the same.
    """
    vmapped = jax.vmap(fn, in_axes=in_axes)
    if not unroll:
        return vmapped

    def mapped(*args):
        seeded = [a for a, axis in zip(args, in_axes, strict=True) if axis == 0]
        n = jax.tree_util.tree_leaves(seeded)[0].shape[0]
        if n > MAX_UNROLLED_SEEDS:
            return vmapped(*args)

        def one(i):
            # A BCOO projection is indexed whole: its batch axis is part of its static shape.
            picked = [
                jax.tree_util.tree_map(lambda leaf: leaf[i], a, is_leaf=_is_sparse)
                if axis == 0
                else a
                for a, axis in zip(args, in_axes, strict=True)
            ]
            return fn(*picked)

        outs = [one(i) for i in range(n)]
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *outs)

    return mapped


def _is_sparse(x) -> bool:
    return isinstance(x, sparse.JAXSparse)


def loops_on_host(apply_fn: ApplyFn, variables: PyTree, x: jax.ShapeDtypeStruct) -> bool:
    """Whether the training chunk should step from the host: on XLA:CPU, for a model with
    convolutions.

    XLA:CPU runs a convolution inside a ``while`` or ``cond`` body (the chunk's ``lax.scan``,
    its skip ``lax.cond``) about 17x slower than at the top level of a program
    (jax-ml/jax#12868; ResNet-20, one seed, batch 32: 3.7 s against 0.21 s a step on this
    project's CPU). Dense layers do not suffer, and there the scan saves the per-step
    dispatch. ``variables`` one seed's (arrays or ``jax.ShapeDtypeStruct``), ``x`` one batch.
    """
    if jax.default_backend() != "cpu":
        return False
    jaxpr = jax.make_jaxpr(lambda v, xb: apply_fn(v, xb))(variables, x)
    return "conv_general_dilated" in str(jaxpr)


def compile_chunk(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    l2: float = 0.0,
    *,
    gather: bool = True,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    host_loop: bool = False,
):
    """A chunk of guarded, seed-vmapped training steps as one jitted ``lax.scan``.

    The device runs the whole chunk without returning to the host: no per-step dispatch and no
    per-step synchronisation. Each step is :func:`guard_finite`'s step, vmapped over seeds as in
    :func:`compile_steps` (the same batch for every seed); a step whose ``valid`` flag is False
    is skipped (``lax.cond`` on an unbatched flag: no compute, the state passes through), so
    chunks of one static length cover an epoch of any length and ``max_steps`` without
    recompiling.

    With ``gather=True`` (the training split on the device)::

      chunk(subs, trainables, opt_states, divs, (x, y), (rows, valid))

    with ``x: (N_train, ...)``, ``y: (N_train,)`` device arrays, ``rows: (L, B)`` int32 indices
    of each step's batch and ``valid: (L,)`` bool; the batch ``x[rows[i]]`` is gathered on the
    device. With ``gather=False`` (batches fed from the host)::

      chunk(subs, trainables, opt_states, divs, (), (xb, yb, valid))

    with ``xb: (L, B, ...)``, ``yb: (L, B)`` the chunk's stacked batches.

    With ``augment``, each step's batch is ``augment(step, xb)`` inside the scan, ``step`` the
    0-based number of the step in the run (int32; the divergence records count the steps
    attempted, the same for every seed), so a resumed run augments as an uninterrupted one.

    With ``host_loop=True`` (:func:`loops_on_host`) the chunk is a :class:`HostChunk` with the
    same signature and results (the scanned inputs then host arrays): the host calls one
    jitted step per valid step, with the seeds unrolled (:func:`over_seeds`), so no
    convolution runs inside a loop or a branch on XLA:CPU.

    Returns:
      ``(trainables, opt_states, divs, losses (L, N), accuracies (L, N))``; the rows of skipped
      steps are zeros. The trainable, optimiser and divergence states are donated.
    """
    step = over_seeds(
        guard_finite(make_train_step(apply_fn, optimizer, l2)),
        in_axes=(0, 0, 0, 0, None, None),
        unroll=host_loop,
    )
    if host_loop:

        def one_step(subs, trainables, opt_states, divs, data, *inputs):
            if gather:
                (rows,) = inputs
                x, y = data
                xb, yb = x[rows], y[rows]
            else:
                xb, yb = inputs
            if augment is not None:
                xb = augment(divs.steps[0], xb)
            return step(subs, trainables, opt_states, divs, xb, yb)

        return HostChunk(jax.jit(one_step, donate_argnums=(1, 2, 3)), gather)

    def chunk(subs, trainables, opt_states, divs, data, xs):
        def body(carry, inputs):
            if gather:
                rows, valid = inputs
                x, y = data
                xb, yb = x[rows], y[rows]
            else:
                xb, yb, valid = inputs

            def run(c):
                x_step = xb if augment is None else augment(c[2].steps[0], xb)
                t, o, dv, loss, acc = step(subs, *c, x_step, yb)
                return (t, o, dv), (loss, acc)

            def skip(c):
                out = jax.eval_shape(run, c)[1]
                return c, jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out)

            return jax.lax.cond(valid, run, skip, carry)

        carry, (losses, accs) = jax.lax.scan(body, (trainables, opt_states, divs), xs)
        return (*carry, losses, accs)

    return jax.jit(chunk, donate_argnums=(1, 2, 3))


class HostChunk:
    """:func:`compile_chunk`'s chunk stepped from the host: ``chunk(subs, trainables,
    opt_states, divs, data, xs)`` calls the jitted one-step program once per valid step of
    ``xs`` (``(rows, valid)`` or ``(xb, yb, valid)``, host arrays, the valid steps first) and
    returns what the scanned chunk returns, the rows of skipped steps zeros.
    """

    def __init__(self, step, gather: bool):
        self.step = step
        self.gather = gather

    def compile(self, subs, trainables, opt_states, divs, data, xs) -> HostChunk:
        """This chunk with its step compiled ahead of time for one step of the shapes of
        ``xs`` (``jax.ShapeDtypeStruct`` chunk inputs, as :meth:`jax.jit`'s ``lower`` takes)."""
        per_step = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in xs[:-1]]
        compiled = self.step.lower(subs, trainables, opt_states, divs, data, *per_step).compile()
        return HostChunk(compiled, self.gather)

    def __call__(self, subs, trainables, opt_states, divs, data, xs):
        *inputs, valid = xs
        losses, accs = [], []
        for i in range(int(np.sum(valid))):
            trainables, opt_states, divs, loss, acc = self.step(
                subs, trainables, opt_states, divs, data, *(a[i] for a in inputs)
            )
            losses.append(loss)
            accs.append(acc)
        pad = len(valid) - len(losses)
        n = divs.at.shape[0]
        losses = jnp.concatenate([jnp.stack(losses), jnp.zeros((pad, n), jnp.float32)])
        accs = jnp.concatenate([jnp.stack(accs), jnp.zeros((pad, n), jnp.float32)])
        return trainables, opt_states, divs, losses, accs
