"""A fast Walsh-Hadamard transform in pure JAX (jit, grad and vmap-able).

``H_n`` is the Sylvester-ordered Hadamard matrix of size ``n = 2^k``,
``H_n[i, j] = (-1)^popcount(i & j)``, unnormalised (entries +-1, ``H_n H_n = n I``). It is
symmetric, so the transform is its own transpose.

Because ``H_n[i, j]`` factorises over any partition of the bits of ``i`` and ``j``,
``H_n = H_{2^a} (x) H_{2^b} (x) ...`` (Kronecker product) for any ``a + b + ... = k``. The
transform below uses that to trade the ``log2(n)`` memory passes of the textbook butterfly for
fewer, heavier ones, which XLA on CPU runs much faster:

1. the lowest (contiguous) ``_GEMM_BITS`` bits: one dense matmul with ``H_{2^a}``
   (``a <= _GEMM_BITS``), so that the first stage runs as a GEMM;
2. the remaining bits, ``_RADIX_BITS`` at a time: a radix-``2^r`` stage written as ``r``
   butterfly levels on ``2^r`` strided slices, which XLA fuses into one loop over memory.

Both are exact in floating point up to rounding (entries +-1; the matmul is pinned to full
precision so GPUs do not drop to TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

#: Bits handled by the dense matmul stage (matrix ``H_{2^6}``, 64 x 64).
_GEMM_BITS = 6
#: Bits per fused butterfly stage after the matmul (radix 8).
_RADIX_BITS = 3


@functools.cache
def hadamard_matrix(n: int) -> np.ndarray:
    """The Sylvester Hadamard matrix ``H_n`` (entries +-1, float64, read-only).

    Args:
      n: a power of two, ``n >= 1``.

    Returns:
      ``(n, n)`` array with ``H[i, j] = (-1)^popcount(i & j)``.

    Raises:
      ValueError: if ``n`` is not a positive power of two.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n must be a power of two >= 1, got {n!r}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def _radix_stage(x: jax.Array, r: int, h: int) -> jax.Array:
    """Apply ``H_r`` to the bits ``[log2 h, log2 h + log2 r)`` of the last axis of ``x (b, n)``."""
    b, n = x.shape
    y = x.reshape(b, n // (r * h), r, h)
    parts = [y[:, :, j] for j in range(r)]
    s = 1
    while s < r:
        nxt = list(parts)
        for j in range(r):
            if not j & s:
                nxt[j] = parts[j] + parts[j + s]
                nxt[j + s] = parts[j] - parts[j + s]
        parts = nxt
        s *= 2
    return jnp.stack(parts, axis=2).reshape(b, n)


def fwht(x: jax.Array, *, normalize: bool = False, matmul_last: bool = False) -> jax.Array:
    """Walsh-Hadamard transform ``H_n x`` along the last axis.

    Args:
      x: ``(..., n)`` floating array, ``n`` a power of two.
      normalize: if True, divide by ``sqrt(n)`` (then the transform is orthogonal).
      matmul_last: run the dense matmul stage last instead of first (the result is the same).
        Use it when the result feeds a gather: XLA fuses a radix stage into its consumer,
        and a fused gather would recompute it for every gathered element.

    Returns:
      ``(..., n)`` array, the same dtype as ``x``.

    Raises:
      ValueError: if the last axis is not a power of two.

    Example:
      >>> import jax.numpy as jnp
      >>> fwht(jnp.array([1.0, 0.0, 0.0, 0.0])).tolist()
      [1.0, 1.0, 1.0, 1.0]
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("fwht: x must have at least one axis, got a scalar")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the last axis must be a power of two >= 1, got {n}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    shape = x.shape
    k = n.bit_length() - 1
    flat = x.reshape(-1, n)
    b = flat.shape[0]
    g = min(_GEMM_BITS, k)

    def gemm(flat):
        if not g:
            return flat
        m = 1 << g
        hm = jnp.asarray(hadamard_matrix(m), dtype=flat.dtype)
        out = jnp.matmul(flat.reshape(-1, m), hm, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(b, n)

    if not matmul_last:
        flat = gemm(flat)
    done = g
    while done < k:
        r = min(_RADIX_BITS, k - done)
        flat = _radix_stage(flat, 1 << r, 1 << done)
        done += r
    if matmul_last:
        flat = gemm(flat)
    out = flat.reshape(shape)
    if normalize:
        out = out * jnp.asarray(n**-0.5, out.dtype)
    return out
