"""The very sparse projection in COO / row-sorted / column-major formats, and ``sparse``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checks import check_grad_is_transpose_and_jit_matches_eager

from subspace_jax import projections as pj
from subspace_jax.projections import _sparse_formats as sf

NAMES = ["sparse_very_coo", "sparse_very_csr", "sparse_very_csc", "sparse"]
D, d = 400, 23


def _vec(seed, n):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _reference(key, D, d):
    """sparse_very's BCOO matrix, densified by jax.experimental.sparse, in float64."""
    bcoo = pj.get_projection("sparse_very").init(key, D, d)
    return np.asarray(bcoo.todense(), np.float64)


@pytest.fixture(
    scope="module",
    # The fast tier checks "sparse" (the row-sorted code); the other formats are slow-tier.
    params=[n if n == "sparse" else pytest.param(n, marks=pytest.mark.slow) for n in NAMES],
)
def built(request):
    proj = pj.get_projection(request.param)
    key = jax.random.key(5)
    state = proj.init(key, D, d)
    return proj, key, state, np.asarray(pj.as_matrix(proj, state, d)), _reference(key, D, d)


def test_same_matrix_as_sparse_very(built):
    _, _, _, M, ref = built
    assert np.array_equal(M, ref.astype(np.float32))
    # The very sparse distribution: density 1/sqrt(D), values +-D^(-1/4).
    nz = ref[ref != 0]
    np.testing.assert_allclose(np.abs(nz), D**-0.25, rtol=1e-6)
    assert abs(nz.size / ref.size - D**-0.5) < 5 * np.sqrt(D**-0.5 / ref.size)


def test_apply_and_transpose_match_reference(built):
    proj, _, state, _, ref = built
    w, g = _vec(1, d), _vec(2, D)
    got = np.asarray(proj.apply(state, jnp.asarray(w)), np.float64)
    np.testing.assert_allclose(got, ref @ w, atol=1e-5, rtol=0)
    got = np.asarray(proj.transpose(state, jnp.asarray(g)), np.float64)
    np.testing.assert_allclose(got, ref.T @ g, atol=1e-5, rtol=0)


def test_gradient_through_apply_is_transpose_and_jit_matches_eager(built):
    proj, _, state, _, _ = built
    w, g = jnp.asarray(_vec(3, d)), jnp.asarray(_vec(4, D))
    check_grad_is_transpose_and_jit_matches_eager(proj, state, w, g)


def test_vmap_over_keys_equals_loop(built):
    proj, _, _, _, _ = built
    keys = jax.random.split(jax.random.key(2), 3)
    w, g = jnp.asarray(_vec(5, d)), jnp.asarray(_vec(6, D))
    states = jax.vmap(proj.init, in_axes=(0, None, None))(keys, D, d)
    batched = jax.vmap(proj.apply, in_axes=(0, None))(states, w)
    looped = jnp.stack([proj.apply(proj.init(k, D, d), w) for k in keys])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)
    batched = jax.vmap(proj.transpose, in_axes=(0, None))(states, g)
    looped = jnp.stack([proj.transpose(proj.init(k, D, d), g) for k in keys])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)


def test_same_key_bit_identical_different_key_differs(built):
    proj, key, _, M, _ = built
    assert np.array_equal(M, pj.as_matrix(proj, proj.init(key, D, d), d))
    other = np.asarray(pj.as_matrix(proj, proj.init(jax.random.key(6), D, d), d))
    assert not np.array_equal(M, other)
    # Independent positions: the supports overlap only by chance (density 1/20 here).
    overlap = np.mean((M != 0) & (other != 0)) / np.mean(M != 0)
    assert overlap < 0.2


def test_row_sorted_format_is_sorted():
    state = pj.get_projection("sparse_very_csr").init(jax.random.key(1), D, d)
    rows, cols = np.asarray(state.rows), np.asarray(state.cols)
    order = np.lexsort((cols, rows))
    assert np.array_equal(order, np.arange(rows.size))


@pytest.mark.slow
def test_small_sizes_and_state_bytes():
    for name in NAMES[:3]:  # "sparse" runs the csr code
        proj = pj.get_projection(name)
        for D_, d_ in [(50, 1), (50, 50)]:
            state = proj.init(jax.random.key(0), D_, d_)
            nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
            assert nbytes == proj.state_bytes(D_, d_)
            assert proj.apply(state, jnp.ones(d_)).shape == (D_,)
        with pytest.raises(ValueError, match=r"d must be in \[1, 10\]"):
            proj.init(jax.random.key(0), 10, 11)


def test_sparse_is_the_fastest_format_bit_for_bit():
    """``sparse`` is ``sparse_very_<FASTEST_FORMAT>``: same state type, bit-identical arrays
    and outputs, and its description names that format; an unknown format is refused."""
    assert sf.FASTEST_FORMAT in ("coo", "csr", "csc")
    proj = pj.get_projection("sparse")
    fastest = pj.get_projection(f"sparse_very_{sf.FASTEST_FORMAT}")
    key = jax.random.key(3)
    state, want = proj.init(key, D, d), fastest.init(key, D, d)
    assert type(state) is type(want)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    w, g = jnp.asarray(_vec(7, d)), jnp.asarray(_vec(8, D))
    assert np.array_equal(proj.apply(state, w), fastest.apply(want, w))
    assert np.array_equal(proj.transpose(state, g), fastest.transpose(want, g))
    assert proj.state_bytes(D, d) == fastest.state_bytes(D, d)
    assert proj.name == "sparse"
    assert f"format chosen automatically ({sf.FASTEST_FORMAT})" in proj.description
    with pytest.raises(ValueError, match="unknown sparse format 'bsr'"):
        sf.sparse_very_format("bsr")
