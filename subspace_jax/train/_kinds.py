"""Subspaces beyond the random one: burn-in and lottery subspaces (Larsen et al. 2022).

Both start with a phase of direct training, batched over seeds like the main loop:

* **burn-in**: train every parameter directly for K steps, then draw the random subspace
  through the burned-in point (``theta0 := theta_K``); the projection is still drawn from the
  run's projection key, so only ``theta0`` differs from a plain random subspace.
* **lottery**: train directly for the configured steps, recording the flattened parameters every
  ``k`` steps (the initial point included), and take the top-d left singular vectors of the
  centred trajectory (a thin SVD of the ``D x T`` matrix, in float64) as an orthonormal P. The
  subspace starts at the model's initialisation, where the trajectory started (Larsen et al.
  2022, "How many degrees of freedom do we need to train deep networks"). P is data-dependent,
  so it is stored (``DenseState(P, ones)``), never regenerated from a key.

SAID (one learned scale per leaf) needs no extra phase: it lives in :mod:`subspace_jax._subspace`.

The functions here know nothing of configs or files: the loop passes the optimiser, the compiled
steps and the data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_jax._errors import UserError
from subspace_jax._subspace import Layout, Subspace, init_trainable, make_layout, to_params
from subspace_jax.data import Dataset, iterate_batches
from subspace_jax.projections import DenseState
from subspace_jax.train._step import compile_steps

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
Progress = Callable[[dict], None]


def lottery_snapshots(total_steps: int, every: int) -> int:
    """Number T of recorded points: the start plus one every ``every`` steps."""
    return 1 + total_steps // every


def default_lottery_every(total_steps: int, dim: int) -> int:
    """Record about ``2 d + 1`` points (at least ``d + 1`` are needed) over the run."""
    return max(1, total_steps // (2 * max(dim, 1)))


def direct_phase(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    params: PyTree,
    data: Dataset,
    *,
    num_steps: int,
    batch_size: int,
    data_seed: int,
    l2: float = 0.0,
    record_every: int | None = None,
    progress: Progress | None = None,
) -> tuple[PyTree, np.ndarray | None]:
    """Train a batch of parameter trees directly for ``num_steps`` steps.

    The batches are the main loop's: ``iterate_batches(..., seed=data_seed, epoch=e)`` for
    ``e = 0, 1, ...``, the same for every seed.

    Args:
      apply_fn: the model, ``apply(params, x) -> logits``.
      optimizer: the optax transformation of direct training.
      params: the starting parameters, every leaf with a leading seed axis ``(N, ...)``.
      data: the dataset (its training split is used).
      num_steps: number of optimiser steps (>= 0).
      batch_size: examples per step.
      data_seed: seed of the batch order.
      l2: weight of ``0.5 ||theta||^2``.
      record_every: if set, also return the flattened parameters at step 0 and every
        ``record_every`` steps.

    Returns:
      ``(params, trajectory)``: the trained parameters (same structure and batch axis) and, when
      recording, a float32 array of shape ``(N, T, D)`` with ``T = 1 + num_steps //
      record_every`` (else None).
    """
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params)
    layout = make_layout(shapes, 0)  # every leaf trained directly
    subs = Subspace(theta0=params, proj_states=(), layout=layout)
    trainables = jax.vmap(init_trainable)(subs)  # fresh copies: the step donates them
    opt_states = jax.vmap(optimizer.init)(trainables)
    train_step, _ = compile_steps(apply_fn, optimizer, l2)

    def flat(t):
        n = t.w.shape[0]
        return np.asarray(
            jax.device_get(jnp.concatenate([x.reshape(n, -1) for x in t.direct], axis=1)),
            np.float32,
        )

    snapshots = [flat(trainables)] if record_every else []
    step = 0
    epoch = 0
    while step < num_steps:
        for xb, yb in iterate_batches(
            data.x_train, data.y_train, batch_size, seed=data_seed, epoch=epoch
        ):
            if step >= num_steps:
                break
            trainables, opt_states, loss, _ = train_step(subs, trainables, opt_states, xb, yb)
            step += 1
            if record_every and step % record_every == 0:
                snapshots.append(flat(trainables))
            if progress is not None:
                progress({"event": "direct_step", "step": step, "total_steps": num_steps})
        epoch += 1
    out = jax.vmap(to_params)(subs, trainables)
    trajectory = np.stack(snapshots, axis=1) if record_every else None
    return out, trajectory


def top_directions(trajectory: np.ndarray, dim: int) -> np.ndarray:
    """The top-``dim`` left singular vectors of a centred trajectory (float64 thin SVD).

    Args:
      trajectory: ``(T, D)`` points (rows).
      dim: number of directions, ``1 <= dim <= T - 1`` (centring removes one rank).

    Returns:
      ``(D, dim)`` float64 with orthonormal columns, each column's sign fixed so that its
      largest-magnitude entry is positive (deterministic across LAPACKs).

    Raises:
      ValueError: if ``dim`` is out of range.
    """
    T, D = trajectory.shape
    if not 1 <= dim <= min(T - 1, D):
        raise UserError(
            f"lottery subspace: d = {dim} is out of range for a trajectory of T = {T} points "
            f"(the centred trajectory has rank <= T - 1 = {T - 1}); allowed 1..{min(T - 1, D)}"
        )
    x = np.asarray(trajectory, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    u, _, _ = np.linalg.svd(x.T, full_matrices=False)
    u = u[:, :dim]
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(dim)])
    signs[signs == 0] = 1.0
    return u * signs[None, :]


def lottery_states(trajectories: np.ndarray, layout: Layout) -> tuple[DenseState, ...]:
    """One stored projection per group from each seed's trajectory.

    Args:
      trajectories: ``(N, T, D)`` recorded parameters (flatten order).
      layout: the subspace layout; group g gets the top ``g.dim`` directions of the rows of its
        leaves.

    Returns:
      One ``DenseState(matrix (N, D_g, d_g) float32, scale ones (N, d_g))`` per group.
    """
    states = []
    for g in layout.groups:
        specs = [layout.spec.leaves[i] for i in g.leaves]
        cols = np.concatenate([np.arange(sp.offset, sp.offset + sp.size) for sp in specs])
        mats = np.stack([top_directions(tr[:, cols], g.dim) for tr in trajectories])
        n = mats.shape[0]
        states.append(
            DenseState(
                matrix=jnp.asarray(mats, jnp.float32),
                scale=jnp.ones((n, g.dim), jnp.float32),
            )
        )
    return tuple(states)
