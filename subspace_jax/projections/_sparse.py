"""Sparse random projections stored as ``jax.experimental.sparse.BCOO``.

Every variant draws each entry of the ``(D, d)`` matrix independently: non-zero with
probability ``p`` (the density), then equal to ``+v`` or ``-v`` with equal probability
(``+v`` only for the positive variant). The non-zeros of a column are found by drawing the gaps
between them from a geometric distribution, which gives exactly i.i.d. Bernoulli(p) positions
without ever forming the dense matrix. Each column holds at most ``K = ceil(Dp + 6 sqrt(Dp(1-p))
+ 10)`` non-zeros (a static size, so the construction is jittable and vmappable); a column that
would need more (probability below 1e-9) is truncated. Unused slots hold the value 0.

The expected squared column norm is ``D p v^2``.

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


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def sparse_columns(key, D: int, d: int, p: float, value: float, signed: bool):
    """Draw the non-zeros of a sparse ``(D, d)`` matrix column by column.

    Returns:
      ``(rows, cols, vals)``, each of shape ``(d * K,)``: row index (int32), column index
      (int32) and value (float32; 0 in unused slots, whose row index is 0).
    """
    K = max_nnz_per_column(D, p)
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
