"""Independent float64 numpy references: each projection's matrix built from its state.

None of these calls the projection's ``apply``/``transpose`` (``as_matrix`` is ``apply`` on
identity columns, so comparing with it only checks linearity). Imported by the projection
test files; collects no tests.
"""

import jax
import numpy as np

from subspace_jax.projections import _dense

# ---- Walsh-Hadamard ----------------------------------------------------------------------


def sylvester(n):
    """H_n from its closed form (-1)^popcount(i & j), not from the recursive construction."""
    i = np.arange(n)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros((n, n), np.int64)
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity


def fwht_numpy(x):
    """Textbook float64 butterfly along the last axis."""
    x = np.array(x, np.float64)
    n, h = x.shape[-1], 1
    while h < n:
        y = x.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        x = np.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2)
        x = x.reshape(*x.shape[:-3], n)
        h *= 2
    return x


def perm_matrix(perm):
    """The matrix of ``x -> x[perm]``."""
    n = len(perm)
    M = np.zeros((n, n))
    M[np.arange(n), perm] = 1.0
    return M


def fastfood_numpy(state):
    """``(V_1; ...; V_nb)[:D, :d]`` with ``V_b = S_b H G_b Pi_b H B_b``, in float64."""
    gauss = np.asarray(state.gauss, np.float64)
    signs = np.asarray(state.signs, np.float64)
    scale = np.asarray(state.scale, np.float64)
    perm = np.asarray(state.perm)
    nb, n = gauss.shape
    H = sylvester(n)
    blocks = []
    for b in range(nb):
        B = signs[b if signs.shape[0] > 1 else 0]
        V = (scale[b][:, None] * H) @ (gauss[b][:, None] * perm_matrix(perm[b])) @ (H * B)
        blocks.append(V)
    return np.concatenate(blocks)[: state.D, : state.d]


def orthogonal_hadamard_numpy(state):
    """``prod_t T_last Sigma'_t T_first Sigma_t Pi_t`` on the first d unit vectors, in float64."""
    D, d = state.D, state.d
    m = 1 << (D.bit_length() - 1)
    Hm = sylvester(m) / np.sqrt(m)
    X = np.eye(D)[:, :d]
    for t in range(state.perm.shape[0]):
        s0, s1 = (np.asarray(state.signs[t, i], np.float64)[:, None] for i in (0, 1))
        X = s0 * X[np.asarray(state.perm[t])]  # Sigma_t Pi_t
        X[:m] = Hm @ X[:m]  # T_first
        if m < D:  # T_last Sigma'_t; for a power-of-two D there is only one window
            X = s1 * X
            X[D - m :] = Hm @ X[D - m :]
    return X


# ---- dense_hash: the documented hash in numpy uint32 (wrapping) arithmetic ---------------


def fmix_numpy(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def hash_matrix_numpy(seed, D, d):
    """The documented hash, in numpy uint32 (wrapping) arithmetic, float64 result."""
    seed = np.uint32(seed)
    with np.errstate(over="ignore"):
        r = fmix_numpy(seed ^ (np.arange(D, dtype=np.uint32) * np.uint32(0x9E3779B1)))
        c = np.arange(d, dtype=np.uint32) * np.uint32(0x85EBCA77)
        h = fmix_numpy(r[:, None] ^ c[None, :])
    sign = np.where(h >> np.uint32(31), -1.0, 1.0)
    return sign / np.sqrt(D)


# ---- the other state types -----------------------------------------------------------------


def dense_numpy(state):
    """``DenseState``: ``matrix * scale[None, :]``."""
    return np.asarray(state.matrix, np.float64) * np.asarray(state.scale, np.float64)[None, :]


def scatter_numpy(rows, cols, vals, shape):
    """Dense ``(D, d)`` float64 from COO triples; duplicates add (as in ``BCOO.todense``)."""
    M = np.zeros(shape, np.float64)
    np.add.at(M, (np.asarray(rows), np.asarray(cols)), np.asarray(vals, np.float64))
    return M


def bcoo_numpy(state):
    """``jax.experimental.sparse.BCOO``: scatter ``indices``/``data`` with numpy."""
    idx = np.asarray(state.indices)
    return scatter_numpy(idx[:, 0], idx[:, 1], state.data, state.shape)


def triplet_numpy(state):
    """``TripletState`` (COO or row-sorted): scatter ``rows, cols, vals``."""
    return scatter_numpy(state.rows, state.cols, state.vals, (state.D, state.d))


def column_slots_numpy(state):
    """``ColumnState``: column ``j`` holds the slots ``rows[j], vals[j]``."""
    d, K = state.rows.shape
    cols = np.repeat(np.arange(d), K)
    return scatter_numpy(np.ravel(state.rows), cols, np.ravel(state.vals), (state.D, d))


def regen_numpy(state):
    """``RegenState``: redraw the blocks with ``gaussian_block`` and scale the columns."""
    D, d = state.D, state.scale.shape[-1]
    rows = _dense.block_rows(D, d)
    starts = range(0, D, rows)
    blocks = [
        np.asarray(_dense.gaussian_block(state.key, b, min(rows, D - s), d), np.float64)
        for b, s in enumerate(starts)
    ]
    return np.concatenate(blocks) * np.asarray(state.scale, np.float64)[None, :]


def hash_numpy(state):
    """``HashState``: the documented hash of ``(seed, row, column)``."""
    return hash_matrix_numpy(int(state.seed), state.D, state.d)


#: State type name -> reference builder.
BY_STATE_TYPE = {
    "DenseState": dense_numpy,
    "BCOO": bcoo_numpy,
    "TripletState": triplet_numpy,
    "ColumnState": column_slots_numpy,
    "FastfoodState": fastfood_numpy,
    "OrthogonalHadamardState": orthogonal_hadamard_numpy,
    "RegenState": regen_numpy,
    "HashState": hash_numpy,
}


def reference_matrix(state):
    """The float64 ``(D, d)`` matrix of any registered projection's state."""
    kind = type(state).__name__
    if kind not in BY_STATE_TYPE:
        raise AssertionError(f"no numpy reference for state type {kind}: add one to this file")
    return BY_STATE_TYPE[kind](jax.device_get(state))
