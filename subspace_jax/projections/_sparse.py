"""Sparse random projections stored as ``jax.experimental.sparse.BCOO``.

Every variant draws each entry of the ``(D, d)`` matrix independently: non-zero with
probability ``p`` (the density), then equal to ``+v`` or ``-v`` with equal probability
(``+v`` only for the positive variant). The non-zeros of a column are found by drawing the gaps
between them from a geometric distribution, which gives exactly i.i.d. Bernoulli(p) positions
without ever forming the dense matrix. Each column holds at most ``K = ceil(Dp + 6 sqrt(Dp(1-p))
+ 10)`` non-zeros (a static size, so the construction is jittable and vmappable); a column that
would need more (probability below 1e-9) is truncated. Unused slots hold the value 0.

The expected squared column norm is ``D p v^2``. No column is ever all zero: a column that
draws no non-zero (probability ``(1 - p)^D``, 2.2% for ``sparse_very`` at ``D = 10``) gets one
entry at a uniformly random row, and the values are scaled by
``c = sqrt(D p / (D p + (1 - p)^D))`` to keep that expected norm (``c = 1`` in float32 for all
but tiny ``D``, e.g. ``D >= 400`` for ``sparse_very``). Per-leaf subspaces on small leaves (a
10-element bias) would otherwise leave some of their dimensions untrained.

===================  ===================  ==========================  ===================
name                 density p            value v                     E||column||
===================  ===================  ==========================  ===================
sparse_achlioptas    1/3                  +-sqrt(3 / D)               1
sparse_very          1/sqrt(D)            +-D^(-1/4)                  1
sparse_original      1/sqrt(D)            +-D^(1/4) / sqrt(d)         sqrt(D / d)
sparse_corrected     1/sqrt(d)            +-d^(1/4) / sqrt(D)         1
sparse2full          1/sqrt(D)            +-sqrt(D)                   D^(3/4)
sparse2              1/sqrt(D)            +sqrt(D) (positive only)    D^(3/4)
===================  ===================  ==========================  ===================

``sparse_achlioptas`` is Achlioptas (2003) with s = 3 and ``sparse_very`` the very sparse
projection of Li, Hastie & Church (2006) with s = sqrt(D), both scaled to unit expected column
norm. ``sparse_original`` is the very sparse formula applied literally to a map from D to d
(what a JL library gives for ``n_features = D, n_components = d``); ``sparse_corrected`` swaps
D and d in it, giving unit columns. ``sparse2full`` and ``sparse2`` keep the unscaled
``+-sqrt(D)`` entries. These are the variants compared in Fig. 5 of the seed report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from subspace_jax.projections._base import Projection, make_projection, register


def max_nnz_per_column(D: int, p: float) -> int:
    """Static bound K on the non-zeros of one column (exceeded with probability < 1e-9)."""
    mean = D * p
    return int(min(D, math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 10)))


def empty_column_scale(D: int, p: float) -> float:
    """``c = sqrt(D p / (D p + (1 - p)^D))``: the value scale keeping ``E||column||^2 = D p v^2``.

    A column with no non-zero (probability ``(1 - p)^D``) gets one entry of size ``v``, which
    adds ``(1 - p)^D v^2`` to the expected squared norm; scaling every value by ``c`` removes it.
    ``c = 1`` in float32 once ``(1 - p)^D < 1e-8`` (e.g. ``sparse_very`` for ``D >= 400``).
    """
    if p >= 1.0:
        return 1.0
    mean = D * p
    return math.sqrt(mean / (mean + (1.0 - p) ** D))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def sparse_columns(key, D: int, d: int, p: float, value: float, signed: bool):
    """Draw the non-zeros of a sparse ``(D, d)`` matrix column by column.

    Positions: i.i.d. Bernoulli(p) per entry, from geometric gaps (``jax.random.geometric``
    maps its uniform ``u = 0`` to 1, so ``log u`` is finite and every gap is ``>= 1``). A column
    left with no non-zero gets one at a uniformly random row with a random sign, in its first
    slot; all values are scaled by :func:`empty_column_scale` so the expected squared column
    norm stays ``D p v^2``. So no column is ever zero, even for tiny per-leaf groups.

    Returns:
      ``(rows, cols, vals)``, each of shape ``(d * K,)``: row index (int32), column index
      (int32) and value (float32; 0 in unused slots, whose row index is 0).
    """
    K = max_nnz_per_column(D, p)
    value = value * empty_column_scale(D, p)
    k_gap, k_sign = jax.random.split(key)
    if p >= 1.0:
        gaps = jnp.ones((d, K), jnp.int32)
    else:
        gaps = jax.random.geometric(k_gap, p, (d, K), dtype=jnp.int32)
    pos = jnp.cumsum(gaps, axis=1) - 1
    valid = pos < D
    if signed:
        sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (d, K)), 1.0, -1.0)
    else:
        sign = jnp.ones((d, K), jnp.float32)
    # Empty columns: one entry at a uniform row (the modulo bias is below D / 2^32).
    fill = jax.random.bits(jax.random.fold_in(key, 2), (2, d), jnp.uint32)
    fill_row = (fill[0] % jnp.uint32(D)).astype(jnp.int32)
    fill_sign = jnp.where(fill[1] >> 31 == 0, 1.0, -1.0) if signed else jnp.ones((d,))
    empty = ~jnp.any(valid, axis=1)
    first = (jnp.arange(K) == 0)[None, :] & empty[:, None]
    valid = valid | first
    pos = jnp.where(first, fill_row[:, None], pos)
    sign = jnp.where(first, fill_sign[:, None], sign)
    vals = jnp.where(valid, sign * value, 0.0).astype(jnp.float32)
    rows = jnp.where(valid, pos, 0).astype(jnp.int32)
    cols = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32)[:, None], (d, K))
    return rows.reshape(-1), cols.reshape(-1), vals.reshape(-1)


def _bcoo_init(density: Callable[[int, int], float], value: Callable[[int, int], float], signed):
    def init(key, D, d):
        rows, cols, vals = sparse_columns(key, D, d, density(D, d), value(D, d), signed)
        indices = jnp.stack([rows, cols], axis=1)
        return jsparse.BCOO((vals, indices), shape=(D, d))

    return init


def _bcoo_mv(P, w):
    return P @ w


def _bcoo_rmv(P, g):
    return g @ P


def sparse_projection(
    name: str,
    density: Callable[[int, int], float],
    value: Callable[[int, int], float],
    *,
    signed: bool = True,
    description: str = "",
) -> Projection:
    """A sparse projection of the family above, stored as BCOO."""

    def state_bytes(D, d):
        return 12 * d * max_nnz_per_column(D, density(D, d))

    def column_norm(D, d):
        return math.sqrt(D * density(D, d)) * value(D, d)

    return make_projection(
        name,
        init=_bcoo_init(density, value, signed),
        mv=_bcoo_mv,
        rmv=_bcoo_rmv,
        column_norm=column_norm,
        state_bytes=state_bytes,
        description=description,
    )


#: name -> (density(D, d), value(D, d), signed, description)
SPARSE_VARIANTS = {
    "sparse_achlioptas": (
        lambda D, d: 1.0 / 3.0,
        lambda D, d: math.sqrt(3.0 / D),
        True,
        "Achlioptas s=3, unit columns (BCOO; larger and slower than dense)",
    ),
    "sparse_very": (
        lambda D, d: D**-0.5,
        lambda D, d: D**-0.25,
        True,
        "very sparse (Li, Hastie & Church), density 1/sqrt(D), unit columns (BCOO)",
    ),
    "sparse_original": (
        lambda D, d: D**-0.5,
        lambda D, d: D**0.25 / math.sqrt(d),
        True,
        "very sparse formula applied literally for D->d, column norm sqrt(D/d) (BCOO)",
    ),
    "sparse_corrected": (
        lambda D, d: d**-0.5,
        lambda D, d: d**0.25 / math.sqrt(D),
        True,
        "very sparse with D and d swapped, density 1/sqrt(d), unit columns (BCOO)",
    ),
    "sparse2full": (
        lambda D, d: D**-0.5,
        lambda D, d: math.sqrt(D),
        True,
        "density 1/sqrt(D), entries +-sqrt(D), column norm D^(3/4) (BCOO)",
    ),
    "sparse2": (
        lambda D, d: D**-0.5,
        lambda D, d: math.sqrt(D),
        False,
        "density 1/sqrt(D), positive entries +sqrt(D), column norm D^(3/4) (BCOO)",
    ),
}


def _register_all():
    for name, (density, value, signed, desc) in SPARSE_VARIANTS.items():
        register(
            name,
            functools.partial(
                sparse_projection, name, density, value, signed=signed, description=desc
            ),
        )


_register_all()
