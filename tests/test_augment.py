"""train/_augment.py: pad-4 random crop and horizontal flip, against a numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subspace_jax.train._augment import (
    PAD,
    augment,
    augment_draws,
    augment_key,
    augment_step,
    batch_key,
)


def _reference(x: np.ndarray, dy, dx, flip, pad: int) -> np.ndarray:
    """Per image: zero-pad, cut the window at (dy, dx), mirror left-right if flip."""
    n, h, w, _ = x.shape
    out = np.empty_like(x)
    for i in range(n):
        padded = np.pad(x[i], ((pad, pad), (pad, pad), (0, 0)))
        crop = padded[dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


@pytest.mark.parametrize("pad", [PAD, 0, 2])
def test_augment_matches_numpy_reference(pad):
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    key = jax.random.key(3)
    dy, dx, flip = (np.asarray(a) for a in augment_draws(key, 16, pad))
    expected = _reference(x, dy, dx, flip, pad)
    np.testing.assert_array_equal(np.asarray(augment(key, jnp.asarray(x), pad)), expected)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(augment, static_argnums=2)(key, x, pad)), expected
    )


def test_draws_cover_every_offset_and_both_flips():
    dy, dx, flip = (np.asarray(a) for a in augment_draws(jax.random.key(0), 4000))
    for d in (dy, dx):
        assert d.min() == 0 and d.max() == 2 * PAD
        counts = np.bincount(d, minlength=2 * PAD + 1)
        assert counts.min() > 4000 / 9 * 0.8  # each of the 9 offsets about equally often
    assert 0.45 < flip.mean() < 0.55


@pytest.mark.slow
def test_deterministic_from_the_data_seed_and_step():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32, 32, 3)), jnp.float32)
    a = augment_step(augment_key(0), jnp.int32(5), x)
    np.testing.assert_array_equal(a, augment_step(augment_key(0), jnp.int32(5), x))
    np.testing.assert_array_equal(a, augment(batch_key(0, 5), x))
    assert not np.array_equal(a, augment_step(augment_key(0), jnp.int32(6), x))
    assert not np.array_equal(a, augment_step(augment_key(1), jnp.int32(5), x))
    assert a.dtype == x.dtype and a.shape == x.shape
