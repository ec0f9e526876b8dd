"""Standard CIFAR augmentation on the device: pad-4 random crop and horizontal flip.

The one module of ``data/`` that uses jax (the loaders stay plain numpy); it is not
re-exported by ``subspace_jax.data`` so importing the loaders does not import jax. The
training loop applies :func:`augment` to each training batch with the key
:func:`batch_key` ``(data_seed, step)``: the augmentation is a pure function of the data seed
and the step, the same for every seed trained together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Padding of the random crop (He et al. 2016: 4 pixels on each side, then a 32x32 crop).
PAD = 4
_TAG = 0x61756700  # separates the augmentation's keys from any other use of the data seed


def augment_draws(key: jax.Array, n: int, pad: int = PAD) -> tuple[jax.Array, ...]:
    """The random choices of :func:`augment` for ``n`` images.

    Returns:
      ``(dy, dx, flip)``: int32 ``(n,)`` crop offsets into the padded image, each uniform in
      ``0..2*pad``, and a bool ``(n,)`` flip flag, true with probability 1/2.
    """
    k_y, k_x, k_f = jax.random.split(key, 3)
    dy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1, dtype=jnp.int32)
    dx = jax.random.randint(k_x, (n,), 0, 2 * pad + 1, dtype=jnp.int32)
    flip = jax.random.bernoulli(k_f, 0.5, (n,))
    return dy, dx, flip


def augment(key: jax.Array, x: jax.Array, pad: int = PAD) -> jax.Array:
    """Random crop after zero padding, then a random horizontal flip, per image.

    Each image is padded with ``pad`` zeros on every side (zero is the mean pixel of
    standardised data), a window of the original size is cut at the offsets
    :func:`augment_draws` gives, and it is mirrored left-right where ``flip`` is true.
    Pure and jittable: the same key gives the same batch.

    Args:
      key: a PRNG key.
      x: images, shape ``(N, H, W, C)``.
      pad: padding on each side (0: flips only).

    Returns:
      The augmented images, shape and dtype of ``x``.

    Example:
      >>> xb = augment(jax.random.key(0), jnp.ones((8, 32, 32, 3)))
      >>> xb.shape
      (8, 32, 32, 3)
    """
    n, h, w, c = x.shape
    dy, dx, flip = augment_draws(key, n, pad)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    zero = jnp.zeros((), jnp.int32)

    def crop(img, a, b):
        return jax.lax.dynamic_slice(img, (a, b, zero), (h, w, c))

    cropped = jax.vmap(crop)(padded, dy, dx)
    return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def batch_key(data_seed: int, step: jax.Array | int) -> jax.Array:
    """The augmentation key of training step ``step`` (0-based) under ``data_seed``."""
    return jax.random.fold_in(augment_key(data_seed), step)


@jax.jit
def augment_step(data_seed_key: jax.Array, step: jax.Array, x: jax.Array) -> jax.Array:
    """``augment(batch_key(data_seed, step), x)``, jitted; ``data_seed_key`` is
    :func:`augment_key` ``(data_seed)``."""
    return augment(jax.random.fold_in(data_seed_key, step), x)


def augment_key(data_seed: int) -> jax.Array:
    """The base key that :func:`augment_step` folds the step into."""
    return jax.random.fold_in(jax.random.key(data_seed), _TAG)
