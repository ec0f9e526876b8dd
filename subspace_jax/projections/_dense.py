"""Stored dense projections: Gaussian (two normalisations) and QR-orthogonal.

The matrix is generated in row blocks, block ``b`` from ``fold_in(key, b)``, into one buffer:
one ``jax.random.normal`` over the full ``(D, d)`` shape peaks at several times the size of P.
The same block function lets a seed-regenerated projection reproduce P bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from subspace_jax.projections._base import Projection, make_projection, register

#: Elements generated per block (16 MiB of float32).
BLOCK_ELEMENTS = 1 << 22


@struct.dataclass
class DenseState:
    """A stored dense projection ``P = matrix * scale[None, :]``.

    Attributes:
      matrix: ``(D, d)`` raw entries.
      scale: ``(d,)`` per-column scale, applied to ``w`` (cheaper than rescaling the matrix).
    """

    matrix: jax.Array
    scale: jax.Array


def block_rows(D: int, d: int) -> int:
    """Rows per generation block for a ``(D, d)`` matrix."""
    return max(1, min(D, BLOCK_ELEMENTS // max(d, 1)))


def gaussian_block(key: jax.Array, b, rows: int, d: int) -> jax.Array:
    """Block ``b`` of a Gaussian matrix: ``(rows, d)`` standard normals from ``fold_in(key, b)``."""
    return jax.random.normal(jax.random.fold_in(key, b), (rows, d), jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def gaussian_matrix(key: jax.Array, D: int, d: int) -> tuple[jax.Array, jax.Array]:
    """Standard-normal ``(D, d)`` matrix built block by block, and its column sums of squares.

    Returns:
      ``(matrix, sumsq)`` with shapes ``(D, d)`` and ``(d,)``.
    """
    rows = block_rows(D, d)
    nfull, tail = divmod(D, rows)

    def body(b, carry):
        buf, sumsq = carry
        blk = gaussian_block(key, b, rows, d)
        buf = jax.lax.dynamic_update_slice(buf, blk, (b * rows, 0))
        return buf, sumsq + jnp.sum(blk * blk, axis=0)

    buf = jnp.zeros((D, d), jnp.float32)
    buf, sumsq = jax.lax.fori_loop(0, nfull, body, (buf, jnp.zeros((d,), jnp.float32)))
    if tail:
        blk = gaussian_block(key, nfull, tail, d)
        buf = buf.at[nfull * rows :].set(blk)
        sumsq = sumsq + jnp.sum(blk * blk, axis=0)
    return buf, sumsq


def _mv(state: DenseState, w: jax.Array) -> jax.Array:
    return state.matrix @ (state.scale * w)


def _rmv(state: DenseState, g: jax.Array) -> jax.Array:
    # g @ P rather than P.T @ g: XLA would materialise the transpose.
    return (g @ state.matrix) * state.scale


def _dense_bytes(D: int, d: int) -> int:
    return 4 * D * d + 4 * d


def _init_unit(key, D, d):
    matrix, sumsq = gaussian_matrix(key, D, d)
    return DenseState(matrix, jax.lax.rsqrt(sumsq))


def _init_entry(key, D, d):
    matrix, _ = gaussian_matrix(key, D, d)
    return DenseState(matrix, jnp.full((d,), d**-0.5, jnp.float32))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _orthogonal_matrix(key, D, d):
    matrix, _ = gaussian_matrix(key, D, d)
    q, r = jnp.linalg.qr(matrix, mode="reduced")
    # Fix the signs so that Q is the unique QR factor with a positive diagonal of R: Haar
    # distributed, and deterministic across LAPACK implementations. (A zero diagonal, possible
    # only for a rank-deficient draw, keeps its column instead of zeroing it as sign(0) would.)
    return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]


def _init_orthogonal(key, D, d):
    return DenseState(_orthogonal_matrix(key, D, d), jnp.ones((d,), jnp.float32))


def dense() -> Projection:
    """Dense Gaussian with unit-length columns (Li et al. 2018; the library default).

    ``P[:, j] = z_j / ||z_j||`` with ``z_j ~ N(0, I_D)``: every column has norm exactly 1.
    Memory ``4 D d`` bytes.
    """
    return make_projection(
        "dense",
        init=_init_unit,
        mv=_mv,
        rmv=_rmv,
        column_norm=lambda D, d: 1.0,
        state_bytes=_dense_bytes,
        description="dense Gaussian, columns scaled to unit length (stored, 4*D*d bytes)",
    )


def dense_unnormalized() -> Projection:
    """Dense Gaussian with i.i.d. ``N(0, 1/d)`` entries (the JL scaling; jgamper's default).

    Expected column norm ``sqrt(D / d)``; the default learning rate is divided by it.
    Memory ``4 D d`` bytes.
    """
    return make_projection(
        "dense_unnormalized",
        init=_init_entry,
        mv=_mv,
        rmv=_rmv,
        column_norm=lambda D, d: (D / d) ** 0.5,
        state_bytes=_dense_bytes,
        description="dense Gaussian, i.i.d. N(0, 1/d) entries (column norm ~ sqrt(D/d))",
    )


def orthogonal() -> Projection:
    """QR-orthogonal: the Q factor of a Gaussian ``(D, d)`` matrix, so ``P^T P = I_d``.

    Requires ``d <= D``. Memory ``4 D d`` bytes, plus LAPACK's workspace (several times P)
    while it is built.
    """
    return make_projection(
        "orthogonal",
        init=_init_orthogonal,
        mv=_mv,
        rmv=_rmv,
        column_norm=lambda D, d: 1.0,
        state_bytes=_dense_bytes,
        max_dim=lambda D: D,
        description="QR-orthogonal (orthonormal columns; QR needs ~3x P while building)",
    )


register("dense", dense)
register("dense_unnormalized", dense_unnormalized)
register("orthogonal", orthogonal)
