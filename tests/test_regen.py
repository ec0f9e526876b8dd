"""dense_regen (bit-identical to dense, never stored), dense_hash (hashed signs) and
choose_projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checks import check_grad_is_transpose_and_jit_matches_eager
from _references import hash_matrix_numpy

from subspace_jax import projections as pj
from subspace_jax.projections import _auto, _dense, _regen

NAMES = ["dense_regen", "dense_hash"]


def _vec(seed, n):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


# ---- independent references ------------------------------------------------------------------


def _reference(name, key, D, d):
    """float64 P from an implementation that shares no apply code with the projection."""
    if name == "dense_regen":
        m, sumsq = _dense.gaussian_matrix(key, D, d)
        return np.asarray(m, np.float64) * np.asarray(jax.lax.rsqrt(sumsq), np.float64)
    seed = int(jax.random.bits(key, (), jnp.uint32))
    return hash_matrix_numpy(seed, D, d)


# ---- the shared properties (one size per projection: dense_regen compiles slowly) --------

SIZES = {"dense_regen": (300, 17), "dense_hash": (300, 17)}


def _clear_regen_caches():
    for f in (_dense.gaussian_matrix, _regen.gaussian_column_sumsq):
        f.clear_cache()
    for f in (_regen._regen_mv, _regen._regen_rmv):
        f.clear_cache()


#: dense_regen runs with small generation blocks so that every test crosses blocks: 300 rows
#: of 17 columns in blocks of 391 // 17 = 23 rows is 13 full blocks and a tail of 1 row.
SMALL_BLOCK = 391


@pytest.fixture(
    scope="module",
    # dense_regen compiles its blocked generator for several seconds: slow tier.
    params=[pytest.param("dense_regen", marks=pytest.mark.slow), "dense_hash"],
)
def built(request):
    """(name, projection, key, state, materialised P, reference P in float64)."""
    name = request.param
    proj = pj.get_projection(name)
    D, d = SIZES[name]
    key = jax.random.key(7)
    _clear_regen_caches()
    with pytest.MonkeyPatch.context() as mp:
        if name == "dense_regen":
            mp.setattr(_dense, "BLOCK_ELEMENTS", SMALL_BLOCK)
            assert divmod(D, _dense.block_rows(D, d)) == (13, 1)
        state = proj.init(key, D, d)
        M = np.asarray(pj.as_matrix(proj, state, d))
        yield name, proj, key, state, M, _reference(name, key, D, d)
    _clear_regen_caches()  # the jitted generators cached the patched blocking for these sizes


def test_apply_and_transpose_match_reference(built):
    _, proj, _, state, M, ref = built
    D, d = ref.shape
    np.testing.assert_allclose(M, ref, atol=1e-6, rtol=0)
    w, g = _vec(1, d), _vec(2, D)
    got = np.asarray(proj.apply(state, jnp.asarray(w)), np.float64)
    np.testing.assert_allclose(got, ref @ w, atol=2e-6 * np.sqrt(d), rtol=0)
    got = np.asarray(proj.transpose(state, jnp.asarray(g)), np.float64)
    np.testing.assert_allclose(got, ref.T @ g, atol=2e-6 * np.sqrt(D), rtol=0)


def test_gradient_through_apply_is_transpose_and_jit_matches_eager(built):
    _, proj, key, state, M, _ = built
    D, d = M.shape
    w, g = jnp.asarray(_vec(3, d)), jnp.asarray(_vec(4, D))
    check_grad_is_transpose_and_jit_matches_eager(proj, state, w, g)


def test_vmap_over_keys_equals_loop(built):
    _, proj, _, _, M, _ = built
    D, d = M.shape
    keys = jax.random.split(jax.random.key(2), 3)
    w = jnp.asarray(_vec(5, d))
    states = jax.vmap(proj.init, in_axes=(0, None, None))(keys, D, d)
    batched = jax.vmap(proj.apply, in_axes=(0, None))(states, w)
    looped = jnp.stack([proj.apply(proj.init(k, D, d), w) for k in keys])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)


def test_same_key_bit_identical_different_key_differs(built):
    _, proj, key, _, M, _ = built
    D, d = M.shape
    again = np.asarray(pj.as_matrix(proj, proj.init(key, D, d), d))
    other = np.asarray(pj.as_matrix(proj, proj.init(jax.random.key(8), D, d), d))
    assert np.array_equal(M, again)
    assert np.mean(M == other) < 0.6


@pytest.mark.parametrize("name", NAMES)
def test_init_rejects_bad_sizes(name):
    proj = pj.get_projection(name)
    with pytest.raises(ValueError, match=r"d must be in \[1, 10\]"):
        proj.init(jax.random.key(0), 10, 11)
    with pytest.raises(ValueError, match="D"):
        proj.init(jax.random.key(0), 0, 1)


@pytest.mark.parametrize("D,d", [(64, 64), (50, 1)])
def test_dense_hash_square_and_single_column(D, d):
    proj = pj.get_projection("dense_hash")
    key = jax.random.key(3)
    M = np.asarray(pj.as_matrix(proj, proj.init(key, D, d), d))
    np.testing.assert_allclose(M, _reference("dense_hash", key, D, d), atol=1e-7, rtol=0)


# ---- dense_regen: bit identity with the stored dense --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("built", ["dense_regen"], indirect=True)
def test_dense_regen_bit_identical_to_stored_dense(built):
    """Bit-identical entries and scales (across 13 generation blocks and a tail)."""
    _, regen, key, s_regen, M, _ = built
    D, d = M.shape
    dense = pj.get_projection("dense")
    s_dense = dense.init(key, D, d)
    # State is O(d): the key and the scales only, and the scales equal dense's bit for bit.
    assert [leaf.size for leaf in jax.tree_util.tree_leaves(s_regen)] == [2, d]
    assert sum(x.nbytes for x in jax.tree_util.tree_leaves(s_regen)) == regen.state_bytes(D, d)
    assert np.array_equal(s_regen.scale, s_dense.scale)
    assert np.array_equal(M, pj.as_matrix(dense, s_dense, d))
    w, g = jnp.asarray(_vec(6, d)), jnp.asarray(_vec(7, D))
    np.testing.assert_allclose(
        regen.apply(s_regen, w), dense.apply(s_dense, w), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        regen.transpose(s_regen, g), dense.transpose(s_dense, g), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_dense_regen_keeps_the_key_as_raw_data_and_round_trips_it():
    regen = pj.get_projection("dense_regen")
    typed, raw, rbg = jax.random.key(3), jax.random.PRNGKey(3), jax.random.key(3, impl="rbg")
    s_typed, s_raw, s_rbg = (regen.init(k, 60, 4) for k in (typed, raw, rbg))
    for s in (s_typed, s_raw, s_rbg):
        assert s.key_data.dtype == jnp.uint32  # numpy-convertible state leaves
    assert np.array_equal(s_raw.key, raw)
    assert np.array_equal(jax.random.key_data(s_rbg.key), jax.random.key_data(rbg))
    assert jax.random.key_impl(s_rbg.key) == jax.random.key_impl(rbg)
    # threefry's typed and raw keys hold the same bits: the same matrix.
    assert np.array_equal(s_typed.scale, s_raw.scale)
    assert not np.array_equal(s_typed.scale, s_rbg.scale)


# ---- dense_hash: the matrix itself ---------------------------------------------------------


def test_dense_hash_entries_signs_and_unit_columns():
    proj = pj.get_projection("dense_hash")
    D, d = 1500, 40
    M = np.asarray(pj.as_matrix(proj, proj.init(jax.random.key(4), D, d), d))
    assert np.all(np.abs(M) == np.float32(1 / np.sqrt(D)))
    np.testing.assert_allclose(np.linalg.norm(M.astype(np.float64), axis=0), 1.0, rtol=1e-6)
    signs = np.sign(M)
    n = D * d
    assert abs(signs.mean()) < 5 / np.sqrt(n)  # fair signs (5 sigma)
    # Nearly orthogonal columns and rows: inner products of independent signs ~ N(0, n).
    gram = signs.T @ signs
    off = gram[~np.eye(d, dtype=bool)]
    assert np.abs(off).max() < 6 * np.sqrt(D)
    assert abs(off.mean()) < 5 * np.sqrt(D) / np.sqrt(off.size)
    rows = signs[:200] @ signs[:200].T
    assert np.abs(rows[~np.eye(200, dtype=bool)]).max() < 6 * np.sqrt(d)


def _clear_hash_caches():
    for f in (_regen._hash_mv, _regen._hash_rmv):
        f.clear_cache()


def test_dense_hash_many_blocks(monkeypatch):
    """Blocks of 9 rows (12 blocks, the last one padded): same matrix as the reference hash."""
    monkeypatch.setattr(_regen, "HASH_BLOCK_ELEMENTS_CPU", 64)
    monkeypatch.setattr(_regen, "HASH_BLOCK_ELEMENTS_ACCEL", 64)
    D, d = 100, 7
    assert _regen._hash_blocking(D, d) == (9, 12)
    _clear_hash_caches()  # the jitted kernels may hold a trace with the default blocking
    try:
        proj = pj.get_projection("dense_hash")
        key = jax.random.key(9)
        state = proj.init(key, D, d)
        M = _reference("dense_hash", key, D, d)
        w, g = _vec(10, d), _vec(11, D)
        np.testing.assert_allclose(proj.apply(state, jnp.asarray(w)), M @ w, atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            proj.transpose(state, jnp.asarray(g)), M.T @ g, atol=1e-5, rtol=0
        )
    finally:
        _clear_hash_caches()


# ---- choose_projection ---------------------------------------------------------------------


def test_choose_projection_follows_the_measured_rule_and_the_budget():
    ample = 10**12
    # Tiny problems: a stored dense P (one small matmul), unless it does not fit.
    assert pj.choose_projection(1000, 100, memory_budget_bytes=ample) == "dense"
    dense_bytes = pj.get_projection("dense").state_bytes(1000, 100)
    assert pj.choose_projection(1000, 100, memory_budget_bytes=3 * dense_bytes - 1) == "sparse"
    # Small d: the CSR very sparse projection; larger d: Fastfood.
    assert pj.choose_projection(159_010, 100, memory_budget_bytes=ample) == "sparse"
    assert pj.choose_projection(159_010, 500, memory_budget_bytes=ample) == "sparse"
    expected = "fastfood" if "fastfood" in pj.projection_names() else "dense_hash"
    assert pj.choose_projection(159_010, 501, memory_budget_bytes=ample) == expected
    assert pj.choose_projection(472_610, 472_610, memory_budget_bytes=ample) == expected
    # Sparse that does not fit falls through to the matrix-free projection.
    assert pj.choose_projection(159_010, 100, memory_budget_bytes=1000) == expected
    assert pj.choose_projection(10**9, 10**5) in ("fastfood", "dense_hash")
    # The default budget is a positive fraction of what is free.
    assert _auto.available_memory_bytes() > 0
    assert pj.choose_projection(100, 10) == "dense"
    assert "auto" not in pj.projection_names()


def test_choose_projection_falls_back_to_dense_hash_without_fastfood(monkeypatch):
    names = tuple(n for n in pj.projection_names() if n != "fastfood")
    monkeypatch.setattr(_auto, "projection_names", lambda: names)
    assert pj.choose_projection(1000, 100, memory_budget_bytes=10) == "dense_hash"


@pytest.mark.parametrize("budget", [0, -5, 1.5, True, "1GB"])
def test_choose_projection_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        pj.choose_projection(100, 10, memory_budget_bytes=budget)


def test_choose_projection_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"d must be in \[1, 100\]"):
        pj.choose_projection(100, 101, memory_budget_bytes=10**9)
