"""The very sparse projection in faster storage formats than ``BCOO @ w``.

Every format holds exactly the matrix of ``sparse_very`` for the same key (the non-zeros come
from the same :func:`~subspace_jax.projections._sparse.sparse_columns` call: density
``1/sqrt(D)``, values ``+-D^(-1/4)``, ``K`` slots per column, unused slots 0 at row 0); only the
layout and the kernels differ. All kernels are plain XLA gathers and ``segment_sum``
scatter-adds, which JAX differentiates, jits and vmaps like any other op.

================  =============================================  ===============================
name              layout                                         apply / transpose
================  =============================================  ===============================
sparse_very_coo   ``rows, cols, vals`` in column order (nnz,)    scatter by row / gather g,
                                                                 sorted scatter by column
sparse_very_csr   the same triple sorted by row (stable, so      sorted scatter by row /
                  columns ascend within a row)                   gather g in order, scatter by
                                                                 column
sparse_very_csc   ``rows, vals`` as ``(d, K)``: column j holds   scatter by row / gather g and
                  its K slots (the column index is implicit)     reduce each row of (d, K)
sparse            ``sparse_very_csr`` (chosen automatically:     as ``sparse_very_csr``
                  fastest in our CPU measurements)
================  =============================================  ===============================

The row-sorted format keeps one row index per non-zero instead of compressing it into a row
pointer (``indptr``): ``segment_sum`` consumes one segment id per element, and re-expanding
``indptr`` on every call (a scatter and a cumulative sum) made it 5-10x slower in our
measurements. Sorting by row makes the gathers and scatters over the long (D) axis sequential,
which is what makes it fast.

Measured on CPU (2 cores shared with other jobs, so noisy; best CPU time of ``apply`` plus
``transpose`` in ms, D = 472,610):

=========  =====  =====  =====  =====
d          BCOO   coo    csr    csc
=========  =====  =====  =====  =====
500        8.7    6.3    3.4    4.9
4,500      154    44     27     31
50,000     1,790  640    530    510
=========  =====  =====  =====  =====

``csr`` is fastest or tied everywhere, so ``sparse`` uses it; ``csc`` needs a third less memory
(no column index) and no sort at ``init``. Not measured on GPU, where BCOO may use cuSPARSE.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from subspace_jax.projections._base import Projection, make_projection, register
from subspace_jax.projections._sparse import SPARSE_VARIANTS, max_nnz_per_column, sparse_columns

_density, _value, _signed, _ = SPARSE_VARIANTS["sparse_very"]


def _columns(key, D, d):
    return sparse_columns(key, D, d, _density(D, d), _value(D, d), _signed)


def _slots(D: int, d: int) -> int:
    return d * max_nnz_per_column(D, _density(D, d))


@struct.dataclass
class TripletState:
    """Non-zeros as parallel arrays (COO or row-sorted), each of shape ``(nnz,)``.

    Attributes:
      rows: int32 row index of each non-zero.
      cols: int32 column index of each non-zero.
      vals: float32 value (0 in unused slots).
      D: number of rows (static).
      d: number of columns (static).
    """

    rows: jax.Array
    cols: jax.Array
    vals: jax.Array
    D: int = struct.field(pytree_node=False)
    d: int = struct.field(pytree_node=False)


@struct.dataclass
class ColumnState:
    """Column-major slots: column ``j`` holds ``K`` non-zeros (``rows[j]``, ``vals[j]``).

    Attributes:
      rows: ``(d, K)`` int32 row indices.
      vals: ``(d, K)`` float32 values (0 in unused slots).
      D: number of rows (static).
    """

    rows: jax.Array
    vals: jax.Array
    D: int = struct.field(pytree_node=False)


# ---- COO (column order, as generated) ------------------------------------------------------


def _coo_init(key, D, d):
    rows, cols, vals = _columns(key, D, d)
    return TripletState(rows, cols, vals, D, d)


@jax.jit
def _coo_mv(s: TripletState, w):
    return jax.ops.segment_sum(s.vals * w[s.cols], s.rows, num_segments=s.D)


@jax.jit
def _coo_rmv(s: TripletState, g):
    return jax.ops.segment_sum(
        s.vals * g[s.rows], s.cols, num_segments=s.d, indices_are_sorted=True
    )


# ---- row-sorted ("CSR order") ------------------------------------------------------------


def _csr_init(key, D, d):
    rows, cols, vals = _columns(key, D, d)
    rows, cols, vals = lax.sort((rows, cols, vals), num_keys=1, is_stable=True)
    return TripletState(rows, cols, vals, D, d)


@jax.jit
def _csr_mv(s: TripletState, w):
    return jax.ops.segment_sum(
        s.vals * w[s.cols], s.rows, num_segments=s.D, indices_are_sorted=True
    )


@jax.jit
def _csr_rmv(s: TripletState, g):
    return jax.ops.segment_sum(s.vals * g[s.rows], s.cols, num_segments=s.d)


# ---- column-major slots ("CSC" with a fixed K per column) --------------------------------


def _csc_init(key, D, d):
    rows, _, vals = _columns(key, D, d)
    return ColumnState(rows.reshape(d, -1), vals.reshape(d, -1), D)


@jax.jit
def _csc_mv(s: ColumnState, w):
    contrib = s.vals * w[:, None]
    return jax.ops.segment_sum(contrib.reshape(-1), s.rows.reshape(-1), num_segments=s.D)


@jax.jit
def _csc_rmv(s: ColumnState, g):
    return jnp.sum(s.vals * g[s.rows], axis=1)


_FORMATS = {
    "coo": (_coo_init, _coo_mv, _coo_rmv, 12, "COO, segment_sum scatter/gather"),
    "csr": (_csr_init, _csr_mv, _csr_rmv, 12, "sorted by row, sorted segment_sum"),
    "csc": (_csc_init, _csc_mv, _csc_rmv, 8, "column-major (d, K) slots, gather-reduce"),
}

#: The format behind the name ``sparse`` (fastest in our measurements, see the module doc).
FASTEST_FORMAT = "csr"


def sparse_very_format(fmt: str, name: str | None = None) -> Projection:
    """The very sparse projection (``sparse_very``'s matrix) stored in format ``fmt``.

    Args:
      fmt: one of ``"coo"``, ``"csr"``, ``"csc"``.
      name: registry name (default ``"sparse_very_<fmt>"``).

    Raises:
      ValueError: for an unknown format.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> proj = sparse_very_format("csr")
      >>> state = proj.init(jax.random.key(0), 1000, 10)
      >>> proj.apply(state, jnp.ones(10)).shape
      (1000,)
    """
    if fmt not in _FORMATS:
        raise ValueError(f"unknown sparse format {fmt!r}; choose one of: {', '.join(_FORMATS)}")
    init, mv, rmv, bytes_per_slot, how = _FORMATS[fmt]
    name = name or f"sparse_very_{fmt}"
    desc = f"very sparse (density 1/sqrt(D), unit columns), {how}"
    if name == "sparse":
        desc = f"very sparse (density 1/sqrt(D), unit columns), format chosen automatically ({fmt})"
    return make_projection(
        name,
        init=init,
        mv=mv,
        rmv=rmv,
        column_norm=lambda D, d: (D * _density(D, d)) ** 0.5 * _value(D, d),
        state_bytes=lambda D, d: bytes_per_slot * _slots(D, d),
        description=desc,
    )


for _fmt in _FORMATS:
    register(f"sparse_very_{_fmt}", functools.partial(sparse_very_format, _fmt))
register("sparse", functools.partial(sparse_very_format, FASTEST_FORMAT, "sparse"))
