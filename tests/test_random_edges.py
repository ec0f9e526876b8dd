"""Every place where random bits become floats, checked on its edge values.

Exhaustively where the map has few enough inputs (all 2^24 inputs of Fastfood's bits-to-normal
map, all 2^23 mantissas behind ``jax.random.normal``/``geometric``), and by construction
elsewhere: a PRNG implementation that returns chosen constant bits drives each ``init`` to its
extremes (all ties in a permutation sort, the largest and smallest normals, every column of a
sparse matrix empty).
"""

import math

import jax
import jax.extend.random as jrandom
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from subspace_jax import projections as pj
from subspace_jax._subspace import NonFiniteStateError, check_finite, init_subspace
from subspace_jax.projections import _fastfood as ff
from subspace_jax.projections import _sparse as sp

N24 = 1 << 24


def _all_top24_bits():
    """Every value of the top 24 bits (the low 8 bits set, which the map must ignore)."""
    return (jnp.arange(N24, dtype=jnp.uint32) << 8) | jnp.uint32(0xA5)


@pytest.mark.slow
def test_normal_from_bits_exhaustive():
    z = np.asarray(jax.jit(ff.normal_from_bits)(_all_top24_bits()))
    assert np.isfinite(z).all()
    assert np.abs(z).max() <= ff.MAX_ABS_NORMAL
    assert np.abs(z).min() > 0  # so ||g_b|| > 0 and chi(n <= 16) > 0
    np.testing.assert_array_equal(z, -z[::-1])  # k -> 2^24 - 1 - k gives -z, exactly
    assert (np.diff(z) > 0).all()  # strictly increasing in k
    # The median gap is that of the N(0, 1) quantiles: the map is the inverse CDF.
    k = np.array([N24 // 4, N24 // 2, 3 * N24 // 4])
    np.testing.assert_allclose(z[k], [-0.6744897, 0.0, 0.6744897], atol=1e-6)


def test_the_float32_uniform_it_replaces_is_caught():
    """The old formula, ``u = (k + 0.5) 2^-24`` in float32, gives u = 1 and z = inf at the top k.

    Checks that the exhaustive test above can fail: the same check on the old map does.
    """

    def old(bits):
        u = ((bits >> 8).astype(jnp.float32) + 0.5) * (2.0**-24)
        return math.sqrt(2.0) * lax.erf_inv(2.0 * u - 1.0)

    z = np.asarray(jax.jit(old)(_all_top24_bits()))
    assert np.flatnonzero(~np.isfinite(z)).tolist() == [N24 - 1]


@pytest.mark.parametrize("n", [1, 2, 16, 32, 1 << 20])
def test_chi_is_finite_and_positive_at_the_extreme_normals(n):
    rows = n if n <= 16 else 1
    for word in (0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000):
        bits = jnp.full((rows, 3), word, jnp.uint32)
        s = np.asarray(ff._chi(bits, n))
        assert np.isfinite(s).all() and (s > 0).all(), (n, hex(word), s)
    # n > 16 uses N(sqrt(n - 1/2), 1/2): positive for the smallest such n, whatever the normal.
    assert math.sqrt(32 - 0.5) - math.sqrt(0.5) * ff.MAX_ABS_NORMAL > 1.7


@pytest.mark.slow
def test_random_permutations_with_all_keys_tied_are_permutations():
    zeros = jnp.zeros((3, 64), jnp.uint32)
    perm, inv = ff.random_permutations(zeros, zeros)
    np.testing.assert_array_equal(np.asarray(perm), np.tile(np.arange(64), (3, 1)))
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(inv), np.asarray(perm), 1), np.tile(np.arange(64), (3, 1))
    )


# --------------------------------------------------------------------------------------------
# A PRNG that returns chosen bits: JAX's own samplers and every init, driven to their edges
# --------------------------------------------------------------------------------------------


def _prng(bits_fn, name):
    return jrandom.define_prng_impl(
        key_shape=(1,),
        seed=lambda s: jnp.reshape(s.astype(jnp.uint32), (1,)),
        split=lambda k, shape: jnp.broadcast_to(k, (*shape, 1)),
        random_bits=bits_fn,
        fold_in=lambda k, d: k,
        name=name,
    )


def _counter_bits(key, bit_width, shape):
    """Every 23-bit mantissa in turn (jax.random.uniform keeps the top 23 of 32 bits)."""
    n = math.prod(shape)
    return ((lax.iota(jnp.uint32, n) % jnp.uint32(1 << 23)) << jnp.uint32(9)).reshape(shape)


COUNTER = _prng(_counter_bits, "counter")


def _constant(word):
    return _prng(lambda key, bit_width, shape: jnp.full(shape, word, jnp.uint32), f"c{word:x}")


EXTREMES = [_constant(w) for w in (0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000)]


def test_jax_normal_exhaustive():
    """``dense``, ``dense_regen``, ``orthogonal``: every ``jax.random.normal`` input is safe."""
    z = np.asarray(jax.random.normal(jax.random.key(0, impl=COUNTER), (1 << 23,), jnp.float32))
    assert np.isfinite(z).all()
    assert np.abs(z).min() > 0  # so the unit-column scale 1 / ||z|| is finite, even at D = 1
    assert np.abs(z).max() < 5.5


@pytest.mark.parametrize("p", [1 / 3, 0.5, 1e-3, 1e-4])
def test_jax_geometric_exhaustive(p):
    """``sparse_*``: every gap is ``>= 1`` and bounded (u = 0 is mapped to 1 by JAX)."""
    g = np.asarray(
        jax.random.geometric(jax.random.key(0, impl=COUNTER), p, (1 << 23,), dtype=jnp.int32)
    )
    assert g.min() == 1
    assert g.max() <= math.ceil(23 * math.log(2) / -math.log1p(-p)) + 1


def _matrix(proj, state, D, d):
    return np.asarray(pj.as_matrix(proj, state, d), np.float64)


# Small sizes (one compile each): (1, 1) is the degenerate case; fastfood's chi draw is exact
# for block size n <= 16 (10, 3) and approximated for n > 16 (40, 20).
EDGE_SIZES = [(1, 1), (10, 3), (40, 20)]


# dense_regen re-creates its key from the implementation's registered name, which a test-only
# PRNG lacks; its matrix is bit-identical to dense's (tests/test_regen.py), covered here.
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in pj.projection_names() if n != "dense_regen"])
def test_every_init_is_finite_at_extreme_bits(name):
    proj = pj.get_projection(name)
    for impl in EXTREMES:
        for D, d in EDGE_SIZES:
            if d > proj.max_dim(D):
                continue
            state = proj.init(jax.random.key(0, impl=impl), D, d)
            for leaf in jax.tree_util.tree_leaves(state):
                if jnp.issubdtype(leaf.dtype, jnp.inexact):
                    assert np.isfinite(np.asarray(leaf)).all(), (name, impl, D, d)
            M = _matrix(proj, state, D, d)
            assert np.isfinite(M).all(), (name, D, d)
            if not name.startswith("sparse"):
                continue
            assert (np.abs(M).sum(axis=0) > 0).all(), (name, D, d)  # no empty column


@pytest.mark.slow
def test_sparse_columns_are_never_empty_for_tiny_groups():
    """2,000 keys at D = 10: without the fill, ~2.2% of very sparse columns would be zero."""
    keys = jax.random.split(jax.random.key(0), 2000)
    # The other formats (sparse_very_coo/csr/csc, sparse) share sparse_very's sparse_columns.
    for name in ("sparse_very", "sparse_achlioptas", "sparse2"):
        proj = pj.get_projection(name)
        for D in (2, 10):
            d = min(D, 4)
            mats = jax.vmap(
                lambda k, proj=proj, D=D, d=d: pj.as_matrix(proj, proj.init(k, D, d), d)
            )(keys)
            norms = np.abs(np.asarray(mats)).sum(axis=1)
            assert (norms > 0).all(), (name, D, np.mean(norms == 0))


@pytest.mark.slow
def test_sparse_fill_keeps_the_expected_column_norm():
    """E||column||^2 = D p v^2 (the table's unit norm) still holds with the empty-column fill."""
    D, d = 10, 4
    keys = jax.random.split(jax.random.key(1), 4000)
    for name in ("sparse_very", "sparse_achlioptas"):
        proj = pj.get_projection(name)
        mats = np.asarray(
            jax.vmap(lambda k, proj=proj: pj.as_matrix(proj, proj.init(k, D, d), d))(keys)
        )
        sq = (mats.astype(np.float64) ** 2).sum(axis=1)  # (keys, d)
        # Entries are +-c v with c v^2 p D = 1: sq is (number of non-zeros) c^2 v^2, sd <= 1.
        se = sq.std() / math.sqrt(sq.size)
        assert abs(sq.mean() - proj.column_norm(D, d) ** 2) < 5 * se, (name, sq.mean(), se)


def test_empty_column_scale():
    assert sp.empty_column_scale(10**6, 1e-3) == 1.0
    D, p = 10, 10**-0.5
    c = sp.empty_column_scale(D, p)
    assert c * c * (D * p + (1 - p) ** D) == pytest.approx(D * p, rel=1e-12)
    assert sp.empty_column_scale(5, 1.0) == 1.0


# --------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------


def _tiny_theta0():
    return {"w": jnp.ones((20, 5)), "b": jnp.zeros((5,))}


@pytest.mark.slow
def test_check_finite_names_projection_seed_and_sizes():
    keys = jax.random.split(jax.random.key(0), 3)
    subs = jax.vmap(lambda k: init_subspace(k, _tiny_theta0(), 7, projection="fastfood"))(keys)
    check_finite(subs, seeds=[5, 6, 7])  # a good batch passes
    st = subs.proj_states[0]
    bad = subs.replace(proj_states=(st.replace(scale=st.scale.at[1, 0, 3].set(jnp.inf)),))
    with pytest.raises(NonFiniteStateError, match=r"'fastfood'.*D = 105, d = 7.*seed\(s\) 6"):
        check_finite(bad, seeds=[5, 6, 7])
    theta0 = dict(subs.theta0, b=subs.theta0["b"].at[2, 0].set(jnp.nan))
    with pytest.raises(NonFiniteStateError, match=r"theta0.*seed\(s\) 7"):
        check_finite(subs.replace(theta0=theta0), seeds=[5, 6, 7])
    one = init_subspace(jax.random.key(0), _tiny_theta0(), 7, projection="dense")
    check_finite(one)
    bad_one = one.replace(proj_states=(one.proj_states[0].replace(scale=jnp.full((7,), jnp.nan)),))
    with pytest.raises(NonFiniteStateError, match="'dense'"):
        check_finite(bad_one)


@pytest.mark.slow
def test_training_refuses_a_non_finite_init(monkeypatch):
    """The loop's guard: a broken init is an error before the first step, not a NaN run."""
    from subspace_jax.train import TrainConfig, _loop, train_and_evaluate

    real = _loop.init_runs

    def broken(*args, **kwargs):
        subs = real(*args, **kwargs)
        st = subs.proj_states[0]
        return subs.replace(proj_states=(st.replace(gauss=st.gauss.at[0, 0, 0].set(jnp.nan)),))

    monkeypatch.setattr(_loop, "init_runs", broken)
    config = TrainConfig(model="mlp_small", dim=20, projection="fastfood", epochs=1, max_steps=2)
    with pytest.raises(NonFiniteStateError, match=r"'fastfood'.*seed\(s\) 0"):
        train_and_evaluate(config)
