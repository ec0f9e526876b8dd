"""Matrix-free structured projections built from fast Walsh-Hadamard transforms.

Two projections, both ``O(D)`` in memory and ``O(D log D)`` in time per product:

* ``fastfood``: the Fastfood transform of Le, Sarlos & Smola (2013), as used for intrinsic
  dimension by Li et al. (2018): stacked ``S H G Pi H B`` blocks with i.i.d.-Gaussian-like
  rows. Columns have unit *expected* norm.
* ``orthogonal_hadamard``: an exactly orthonormal ``P`` (``P^T P = I_d``) for any ``D``, from
  products of random permutations, random signs and normalised Hadamard transforms on
  overlapping power-of-two windows. No QR, no stored matrix.

Both hold only the random diagonals and permutations; static sizes (``D``, ``d``) live in the
pytree auxiliary data, so ``jax.vmap`` over keys gives a batch of independent projections.
The transposes are written by hand and use gathers with the inverse permutations (no
scatters); the registry makes them the VJP of ``apply``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from subspace_jax.projections._base import Projection, make_projection, register
from subspace_jax.projections._hadamard import fwht

# --------------------------------------------------------------------------------------------
# Fastfood
# --------------------------------------------------------------------------------------------


def fastfood_sizes(D: int, d: int) -> tuple[int, int]:
    """Block size ``n = 2^ceil(log2 d)`` and number of blocks ``ceil(D / n)``."""
    n = 1 << (d - 1).bit_length()
    return n, -(-D // n)


@struct.dataclass
class FastfoodState:
    """Stacked Fastfood blocks ``V_b = S_b H G_b Pi_b H B_b``, ``b < nb``, over ``n`` coordinates.

    ``P = (V_1; ...; V_nb)[:D, :d]``, ``H`` the unnormalised ``n x n`` Hadamard matrix. Arrays
    of shape ``(nb, n)`` hold one block per row.

    Attributes:
      signs: ``(nb, n)`` float32, the diagonals of ``B_b`` (+-1); or ``(1, n)`` when one ``B``
        is shared by all blocks (``fastfood(shared_signs=True)``, the registered default).
      gauss: ``(nb, n)`` float32, the diagonals of ``G_b`` (standard normal).
      perm: ``(nb, n)`` int32, the permutations within each block: ``(Pi_b x)[i] = x[perm[b, i]]``
        for ``x`` of shape ``(n,)``.
      inv_perm: ``(nb, n)`` int32, the inverse permutations as indices into the flattened
        ``(nb * n,)`` array (block offset ``b n`` included): ``Pi^T`` is one flat gather over all
        blocks, not a scatter.
      scale: ``(nb, n)`` float32, the diagonals of ``S_b`` times the global normalisation:
        ``s_i / (||g_b|| sqrt(n D))`` with ``E[s_i^2] = n`` (``s_i ~ chi(n)``).
      D: number of rows (static).
      d: number of columns (static).
    """

    signs: jax.Array
    gauss: jax.Array
    perm: jax.Array
    inv_perm: jax.Array
    scale: jax.Array
    D: int = struct.field(pytree_node=False)
    d: int = struct.field(pytree_node=False)


# All the randomness of an init comes from one ``jax.random.bits`` call: on CPU, XLA takes about
# a second to compile each random-number generator call, more than the init itself.


def _signs(bits: jax.Array) -> jax.Array:
    """+-1 (float32) from the top bit of each uint32."""
    return jnp.where(bits >> 31 == 0, 1.0, -1.0).astype(jnp.float32)


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """Standard normals (float32) from uint32 bits, by inverting the normal CDF.

    The top 24 bits ``k`` give the odd integer ``m = 2k + 1 - 2^24`` (``|m| < 2^24``), computed
    in int32 and converted exactly to float32; ``x = m / 2^24`` is then exact too, so
    ``x = 2u - 1`` for the open uniform ``u = (k + 1/2) / 2^24`` without any float rounding:
    ``|x| <= 1 - 2^-24 < 1`` and ``x != 0``. Hence ``z = sqrt(2) erf_inv(x)`` is finite,
    non-zero, bounded by ``|z| <= 5.42``, exactly symmetric (``k -> 2^24 - 1 - k`` maps ``z``
    to ``-z``) and strictly increasing in ``k``; all ``2^24`` inputs are checked by a test.

    (Forming ``u`` first in float32 is wrong: ``2^24 - 1 + 0.5`` rounds to ``2^24``, so
    ``u = 1`` and ``z = inf`` once in ``2^24`` draws.)
    """
    m = ((bits >> 8).astype(jnp.int32) << 1) + (1 - (1 << 24))
    x = m.astype(jnp.float32) * (2.0**-24)
    return math.sqrt(2.0) * jax.lax.erf_inv(x)


#: The largest ``|z|`` that :func:`normal_from_bits` returns (at ``k = 0`` and ``2^24 - 1``).
MAX_ABS_NORMAL = 5.42


def random_permutations(bits_hi: jax.Array, bits_lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Uniform random permutations of ``range(n)``, one per row, and their inverses.

    One sort on two 32-bit random keys per element (ties have probability ``~n^2 / 2^65``),
    much faster than ``jax.random.permutation``; the inverse is a scatter (only at init).

    Args:
      bits_hi: ``(rows, n)`` uint32 random bits, the first sort key.
      bits_lo: ``(rows, n)`` uint32 random bits, the tie-breaking key.

    Returns:
      ``(perm, inv)``, both ``(rows, n)`` int32, with ``inv[r, perm[r, i]] = i``.
    """
    rows, n = bits_hi.shape
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
    *_, perm = jax.lax.sort((bits_hi, bits_lo, iota), dimension=1, num_keys=2)
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]
    inv = jnp.zeros((rows, n), jnp.int32).at[row, perm].set(iota, unique_indices=True)
    return perm, inv


def _chi(bits: jax.Array, n: int) -> jax.Array:
    """Samples with ``E[s^2] = n`` exactly: ``chi(n)`` for ``n <= 16``, else its normal approx.

    For ``n <= 16``, ``bits`` has shape ``(n, ...)`` and ``s`` is the norm of ``n`` normals;
    otherwise ``bits`` has shape ``(1, ...)`` and ``s ~ N(sqrt(n - 1/2), 1/2)``, the classical
    approximation of the chi distribution (error ``O(1/n)``), whose second moment is exactly
    ``n``. Every sample is positive: each normal is non-zero, and for ``n > 16`` (so
    ``n >= 32``) ``sqrt(n - 1/2) - sqrt(1/2) MAX_ABS_NORMAL > 1.7``.
    """
    z = normal_from_bits(bits)
    if n <= 16:
        return jnp.sqrt(jnp.sum(z * z, axis=0))
    return math.sqrt(n - 0.5) + math.sqrt(0.5) * z[0]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fastfood_init(key: jax.Array, D: int, d: int, shared_signs: bool) -> FastfoodState:
    n, nb = fastfood_sizes(D, d)
    bits = jax.random.bits(key, (4 + (n if n <= 16 else 1), nb, n), jnp.uint32)
    signs = _signs(bits[0, :1] if shared_signs else bits[0])
    gauss = normal_from_bits(bits[1])
    perm, inv_perm = random_permutations(bits[2], bits[3])
    inv_perm = inv_perm + (jnp.arange(nb, dtype=jnp.int32) * n)[:, None]
    # s_i ~ chi(n), the norm of an n-dimensional standard normal vector (Le et al.): a Gaussian
    # row's norm. Divided by ||g_b|| (the norm of every row of H G Pi H B) and sqrt(n D).
    chi = _chi(bits[4:], n)
    gnorm = jnp.sqrt(jnp.sum(gauss * gauss, axis=1, keepdims=True))
    scale = chi / (gnorm * math.sqrt(n * D))
    return FastfoodState(signs, gauss, perm, inv_perm, scale, D=D, d=d)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[idx]`` for in-bounds ``idx`` (no negative-index fix-up)."""
    return jnp.take(x, idx, mode="clip")


def _sum_blocks(y: jax.Array) -> jax.Array:
    """``y.sum(0)`` for ``y (nb, n)``, as a matvec: XLA's CPU column reduction is slower."""
    if y.shape[0] == 1:
        return y[0]
    ones = jnp.ones((y.shape[0],), y.dtype)
    return jnp.matmul(ones, y, precision=jax.lax.Precision.HIGHEST)


# Every Hadamard transform whose result is gathered runs its matmul stage last, so that the
# gather reads a materialised array instead of recomputing a fused radix stage per element.


def _fastfood_mv(state: FastfoodState, w: jax.Array) -> jax.Array:
    nb, n = state.gauss.shape
    x = jnp.pad(w, (0, n - w.shape[0]))
    if state.signs.shape[0] == 1:  # one B: H B w once, then every block gathers from it
        x = _take(fwht(state.signs[0] * x, matmul_last=True), state.perm)
    else:  # H B_b w per block, then Pi_b as one flat gather
        offset = (jnp.arange(nb, dtype=state.perm.dtype) * n)[:, None]
        x = _take(fwht(state.signs * x, matmul_last=True).reshape(-1), state.perm + offset)
    x = fwht(state.gauss * x)
    return (state.scale * x).reshape(-1)[: state.D]


def _fastfood_rmv(state: FastfoodState, g: jax.Array) -> jax.Array:
    nb, n = state.gauss.shape
    y = jnp.pad(g, (0, nb * n - g.shape[0])).reshape(nb, n)
    y = state.gauss * fwht(state.scale * y, matmul_last=True)
    y = _take(y.reshape(-1), state.inv_perm)  # Pi_b^T: a gather with the inverse permutations
    if state.signs.shape[0] == 1:  # sum over blocks first: one H B for all of them
        y = state.signs[0] * fwht(_sum_blocks(y))
    else:
        y = _sum_blocks(state.signs * fwht(y))
    return y[: state.d]


def fastfood(*, shared_signs: bool = True) -> Projection:
    """Fastfood (Le et al. 2013; Li et al. 2018): ``O(D)`` memory, ``O(D log d)`` time.

    With ``n = 2^ceil(log2 d)`` and ``nb = ceil(D / n)`` blocks, ``w`` is zero-padded to ``n``
    coordinates and

        ``P w = (V_1 w; ...; V_nb w)[:D]``,  ``V_b = S_b H G_b Pi_b H B_b``,

    where ``H`` is the unnormalised ``n x n`` Walsh-Hadamard matrix, ``B_b`` random signs,
    ``Pi_b`` a random permutation, ``G_b`` standard normals, and
    ``S_b = diag(s) / (||g_b|| sqrt(n D))`` with ``s_i ~ chi(n)`` (Le et al.'s row scaling;
    for ``n > 16`` the chi draw is its normal approximation ``N(sqrt(n - 1/2), 1/2)``, which
    keeps ``E[s_i^2] = n`` exact).

    Scale: ``H G Pi H B`` has every row of norm ``sqrt(n) ||g||``, and by symmetry
    ``E[(H G Pi H B)_ij^2 / ||g||^2] = 1``; so ``E[(V_b)_ij^2] = E[s_i^2] / (n D) = 1 / D`` and
    ``E||P e_j||^2 = 1`` exactly: unit expected (squared) column norm, ``column_norm = 1``.
    Single columns' norms scatter around 1 (a few percent at ``D`` of a few thousand), and
    columns are nearly, not exactly, orthogonal (like ``dense``).

    ``shared_signs`` (default True): one ``B`` for all blocks. Then ``H B w`` is computed once
    (``n`` points) and, in the transpose, the blocks are summed before the last ``H B``: each
    product runs one Hadamard transform over all ``(nb, n)`` coordinates instead of two, about
    twice as fast when ``d << D`` and identical when ``d > D / 2`` (one block). The columns
    keep the same distribution block by block (``B`` only flips whole columns), and the blocks
    stay independent through their own ``G_b``, ``Pi_b``, ``S_b``; only the sign of each
    column is shared across blocks. ``shared_signs=False`` is Le et al.'s construction with
    an independent ``B_b`` per block.

    Memory: ``16 n nb + 4 n`` bytes (``20 n nb`` with per-block signs), at most about ``32 D``
    (``40 D``), since ``n nb < D + n <= 2 D``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> P = fastfood()
      >>> state = P.init(jax.random.key(0), 1000, 30)
      >>> P.apply(state, jnp.ones(30)).shape
      (1000,)
    """

    def init(key, D, d):
        return _fastfood_init(key, D, d, shared_signs)

    def state_bytes(D, d):
        n, nb = fastfood_sizes(D, d)
        return 16 * n * nb + 4 * n * (1 if shared_signs else nb)

    return make_projection(
        "fastfood",
        init=init,
        mv=_fastfood_mv,
        rmv=_fastfood_rmv,
        column_norm=lambda D, d: 1.0,
        state_bytes=state_bytes,
        max_dim=lambda D: D,
        description="Fastfood S H G Pi H B blocks (matrix-free, O(D) memory, unit columns)",
        options=None if shared_signs else {"shared_signs": False},
    )


# --------------------------------------------------------------------------------------------
# Orthogonal Hadamard
# --------------------------------------------------------------------------------------------

#: Number of (permutation, signs, Hadamard windows) rounds.
ORTHOGONAL_HADAMARD_ROUNDS = 3


def hadamard_window(D: int) -> int:
    """The window size ``m``: the largest power of two ``<= D``."""
    return 1 << (D.bit_length() - 1)


@struct.dataclass
class OrthogonalHadamardState:
    """``R = prod_t W_t Pi_t`` over ``t < L`` rounds; ``P = R[:, :d]``.

    ``W_t = T_last Sigma'_t T_first Sigma_t``: ``Sigma_t = diag(signs[t, 0])`` and
    ``Sigma'_t = diag(signs[t, 1])``; ``T_first`` (``T_last``) applies the normalised Hadamard
    ``H_m / sqrt(m)`` to the first (last) ``m`` coordinates and is the identity elsewhere,
    ``m`` the largest power of two ``<= D`` (``T_last`` and ``Sigma'_t`` are omitted when
    ``m = D``).

    Attributes:
      perm: ``(L, D)`` int32, ``(Pi_t x)[i] = x[perm[t, i]]``.
      inv_perm: ``(L, D)`` int32, the inverse permutations (``Pi_t^T`` as a gather).
      signs: ``(L, 2, D)`` float32, +-1.
      D: number of rows (static).
      d: number of columns (static).
    """

    perm: jax.Array
    inv_perm: jax.Array
    signs: jax.Array
    D: int = struct.field(pytree_node=False)
    d: int = struct.field(pytree_node=False)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _orth_init(key: jax.Array, D: int, d: int) -> OrthogonalHadamardState:
    bits = jax.random.bits(key, (4, ORTHOGONAL_HADAMARD_ROUNDS, D), jnp.uint32)
    perm, inv = random_permutations(bits[0], bits[1])
    signs = _signs(jnp.stack([bits[2], bits[3]], axis=1))
    return OrthogonalHadamardState(perm, inv, signs, D=D, d=d)


def _hadamard_window(x: jax.Array, start: int, m: int) -> jax.Array:
    """Apply ``H_m / sqrt(m)`` to ``x[start:start + m]``, leaving the other entries alone."""
    mid = fwht(x[start : start + m], normalize=True, matmul_last=True)
    return jnp.concatenate([x[:start], mid, x[start + m :]])


# The rounds run under ``lax.scan``: one compiled body instead of L unrolled copies.


def _orth_mv(state: OrthogonalHadamardState, w: jax.Array) -> jax.Array:
    D = state.D
    m = hadamard_window(D)

    def round_(x, xs):
        perm, signs = xs
        x = signs[0] * _take(x, perm)  # Sigma_t Pi_t
        x = _hadamard_window(x, 0, m)  # T_first
        if m < D:
            x = _hadamard_window(signs[1] * x, D - m, m)  # T_last Sigma'_t
        return x, None

    # perm's length: D, or more when the state is padded for sharding (subspace_jax.sharding)
    x0 = jnp.pad(w, (0, state.perm.shape[-1] - w.shape[0]))
    x, _ = jax.lax.scan(round_, x0, (state.perm, state.signs))
    return x


def _orth_rmv(state: OrthogonalHadamardState, g: jax.Array) -> jax.Array:
    D = state.D
    m = hadamard_window(D)

    def round_(y, xs):
        inv_perm, signs = xs
        if m < D:
            y = signs[1] * _hadamard_window(y, D - m, m)  # Sigma'_t T_last
        y = signs[0] * _hadamard_window(y, 0, m)  # Sigma_t T_first
        return _take(y, inv_perm), None  # Pi_t^T, a gather

    y, _ = jax.lax.scan(round_, g, (state.inv_perm, state.signs), reverse=True)
    return y[: state.d]


def _orth_bytes(D: int, d: int) -> int:
    return 16 * ORTHOGONAL_HADAMARD_ROUNDS * D


def orthogonal_hadamard() -> Projection:
    """Exactly orthonormal columns (``P^T P = I_d``) in ``O(D)`` memory, for any ``D``.

    Construction. Let ``m`` be the largest power of two ``<= D`` (so ``m > D / 2``). Define
    the ``D x D`` orthogonal matrices

    * ``Pi_t``: a random permutation;
    * ``Sigma_t``, ``Sigma'_t``: diagonals of random signs;
    * ``T_first`` / ``T_last``: the normalised Hadamard ``H_m / sqrt(m)`` acting on the first /
      last ``m`` coordinates, the identity on the others.

    Then ``R = prod_{t=L..1} (T_last Sigma'_t T_first Sigma_t Pi_t)`` with ``L = 3`` rounds is
    a product of orthogonal matrices, hence orthogonal, and ``P = R[:, :d]`` (``w``
    zero-padded to ``D``) has exactly orthonormal columns, for any ``D``. (Restricting the
    rows of a larger ``2^k x 2^k`` orthogonal matrix to ``D < 2^k`` would lose exact
    orthogonality; windows inside ``D`` avoid that.)

    Why each piece: the windows overlap (``2m > D``), so every coordinate passes through at
    least one ``m``-point Hadamard per round; the permutations spread each column over all
    ``D`` coordinates across rounds; ``Sigma'_t`` breaks the structure between the two
    windows (``T_last T_first`` alone maps some columns to shifted, truncated Walsh functions
    and back to spikes: entries up to ``50 / sqrt(D)`` at ``D = 4097``). With it, the largest
    entry is that of a Gaussian matrix with unit columns (about ``4.5 / sqrt(D)``). When ``D``
    is a power of two there is one window and this is the randomised Hadamard product
    ``H Sigma_3 H Sigma_2 H Sigma_1`` with permutations.

    Trade-off versus ``dense``: ``dense`` has exactly unit columns that are only nearly
    orthogonal (off-diagonals of ``P^T P`` of order ``1 / sqrt(D)``, largest about
    ``2 sqrt(ln(d) / D)``) and costs ``4 D d`` bytes and ``O(D d)`` time per product;
    ``orthogonal`` (QR) is exactly orthonormal but needs several times that memory while
    building. This one is exactly orthonormal with ``48 D`` bytes, builds in about a second
    at ``D = 472,610``, and costs ``O(L D log D)`` per product, independent of ``d`` (so it
    is slower than ``dense`` for small ``d``). Its entries are not Gaussian and its columns
    are a pseudo-random, not Haar-distributed, orthonormal frame. ``max_dim(D) = D``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> P = orthogonal_hadamard()
      >>> state = P.init(jax.random.key(0), 1000, 30)
      >>> P.apply(state, jnp.ones(30)).shape
      (1000,)
    """
    return make_projection(
        "orthogonal_hadamard",
        init=_orth_init,
        mv=_orth_mv,
        rmv=_orth_rmv,
        column_norm=lambda D, d: 1.0,
        state_bytes=_orth_bytes,
        max_dim=lambda D: D,
        description="exactly orthonormal randomised Hadamard windows (matrix-free, O(D) memory)",
    )


register("fastfood", fastfood)
register("orthogonal_hadamard", orthogonal_hadamard)
