"""Every property, across every registered projection (one registry of factories)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import reference_matrix

from subspace_jax import projections as pj

NAMES = pj.projection_names()
D, d = 2000, 40
#: Projections whose registry-wide tests run in the fast tier (the default and the ones
#: ``auto`` picks); the others compile for several seconds each and run in the slow tier.
FAST_TIER = ("dense", "fastfood", "sparse")
PARAMS = [n if n in FAST_TIER else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


@pytest.fixture(scope="module", params=PARAMS)
def built(request):
    """(projection, state, float64 P built in numpy from the state) for the module's sizes.

    P comes from ``_references.reference_matrix``, never from ``apply`` (``as_matrix`` is
    ``apply`` on identity columns, so comparing with it would only check linearity).
    """
    proj = pj.get_projection(request.param)
    state = proj.init(jax.random.key(0), D, d)
    return proj, state, reference_matrix(state)


def _rng_vec(seed, n):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_registry_lists_core_projections():
    for name in [
        "dense",
        "dense_unnormalized",
        "orthogonal",
        "sparse_achlioptas",
        "sparse_very",
        "sparse_original",
        "sparse_corrected",
        "sparse2full",
        "sparse2",
    ]:
        assert name in NAMES
    with pytest.raises(ValueError, match="unknown projection 'nope'"):
        pj.get_projection("nope")


def test_as_matrix_matches_reference(built):
    proj, state, M = built
    got = np.asarray(pj.as_matrix(proj, state, d), np.float64)
    np.testing.assert_allclose(got, M, atol=1e-5 * np.abs(M).max() * np.sqrt(d))


def test_apply_matches_reference_matrix(built):
    proj, state, M = built
    assert M.shape == (D, d)
    w = _rng_vec(1, d)
    got = np.asarray(proj.apply(state, jnp.asarray(w)), np.float64)
    scale = np.abs(M).max() * np.sqrt(d)
    np.testing.assert_allclose(got, M @ w.astype(np.float64), atol=1e-5 * scale)


def test_transpose_matches_reference_matrix(built):
    proj, state, M = built
    g = _rng_vec(2, D)
    got = np.asarray(proj.transpose(state, jnp.asarray(g)), np.float64)
    scale = np.abs(M).max() * np.sqrt(D)
    np.testing.assert_allclose(got, M.T @ g.astype(np.float64), atol=1e-5 * scale)


def test_adjoint_identity_float64(built):
    proj, state, _ = built
    w, g = _rng_vec(3, d), _rng_vec(4, D)
    pw = np.asarray(proj.apply(state, jnp.asarray(w)), np.float64)
    ptg = np.asarray(proj.transpose(state, jnp.asarray(g)), np.float64)
    lhs, rhs = pw @ g.astype(np.float64), w.astype(np.float64) @ ptg
    norm = np.linalg.norm(pw) * np.linalg.norm(g)
    assert abs(lhs - rhs) <= 1e-5 * norm


def test_gradient_is_transpose_against_float64_reference(built):
    """grad_w L(theta0 + P w) == P^T grad_theta L, with grad_theta computed in numpy float64."""
    proj, state, M = built
    rng = np.random.default_rng(5)
    theta0 = rng.standard_normal(D)
    c = rng.standard_normal(D)
    w = 0.1 * rng.standard_normal(d) / max(proj.column_norm(D, d), 1.0)

    def loss(w):
        theta = jnp.asarray(theta0, jnp.float32) + proj.apply(state, w)
        return jnp.sum(jnp.sin(theta) * jnp.asarray(c, jnp.float32))

    got = np.asarray(jax.grad(loss)(jnp.asarray(w, jnp.float32)), np.float64)
    theta = theta0 + M @ w
    want = M.T @ (np.cos(theta) * c)
    scale = np.abs(M).max() * np.sqrt(D) * np.abs(c).max()
    np.testing.assert_allclose(got, want, atol=1e-4 * scale)


def test_jit_and_eager_agree(built):
    proj, state, _ = built
    w, g = jnp.asarray(_rng_vec(6, d)), jnp.asarray(_rng_vec(7, D))
    eager = proj.apply(state, w), proj.transpose(state, g)
    jitted = jax.jit(proj.apply)(state, w), jax.jit(proj.transpose)(state, g)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max())
        )


def test_vmap_over_keys_equals_loop(built):
    proj, _, _ = built
    keys = jax.random.split(jax.random.key(11), 3)
    w = jnp.asarray(_rng_vec(8, d))
    states = jax.vmap(proj.init, in_axes=(0, None, None))(keys, D, d)
    batched = jax.vmap(proj.apply, in_axes=(0, None))(states, w)
    for i in range(3):
        one = proj.apply(proj.init(keys[i], D, d), w)
        np.testing.assert_allclose(
            np.asarray(batched[i]),
            np.asarray(one),
            rtol=1e-5,
            atol=1e-5 * float(jnp.abs(one).max()),
        )


def test_same_key_identical_different_key_differs(built):
    proj, state, M = built
    again = proj.init(jax.random.key(0), D, d)
    for a, b in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(again), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    other = np.asarray(pj.as_matrix(proj, proj.init(jax.random.key(1), D, d), d))
    assert not np.allclose(other, M)


def test_column_norms_match_documented_value(built):
    proj, _, M = built
    expected = proj.column_norm(D, d)
    mean_sq = np.mean(np.sum(M * M, axis=0))
    assert mean_sq == pytest.approx(expected**2, rel=0.1)


def test_init_rejects_bad_sizes():
    for name in NAMES:
        proj = pj.get_projection(name)
        with pytest.raises(ValueError, match="d must be in"):
            proj.init(jax.random.key(0), 100, 0)
        with pytest.raises(ValueError, match="d must be in"):
            proj.init(jax.random.key(0), 100, proj.max_dim(100) + 1)
        with pytest.raises(ValueError, match="must be an integer"):
            proj.init(jax.random.key(0), 100, 2.5)


@pytest.mark.slow
def test_orthogonal_has_orthonormal_columns():
    proj = pj.get_projection("orthogonal")
    P = np.asarray(pj.as_matrix(proj, proj.init(jax.random.key(3), 500, 120), 120))
    np.testing.assert_allclose(P.T @ P, np.eye(120), atol=1e-5)
    # d == D is allowed: a square orthogonal matrix.
    Q = np.asarray(pj.as_matrix(proj, proj.init(jax.random.key(3), 30, 30), 30))
    np.testing.assert_allclose(Q @ Q.T, np.eye(30), atol=1e-5)


@pytest.mark.slow
def test_dense_columns_exactly_unit_and_unnormalised_entries_have_variance_1_over_d():
    P = np.asarray(
        pj.as_matrix(
            pj.get_projection("dense"),
            pj.get_projection("dense").init(jax.random.key(0), 3000, 50),
            50,
        )
    )
    np.testing.assert_allclose(np.linalg.norm(P, axis=0), 1.0, rtol=1e-5)
    proj = pj.get_projection("dense_unnormalized")
    U = np.asarray(pj.as_matrix(proj, proj.init(jax.random.key(0), 3000, 50), 50))
    assert U.var() == pytest.approx(1 / 50, rel=0.03)
    assert abs(U.mean()) < 4 * np.sqrt(1 / 50 / U.size)


@pytest.mark.slow
def test_dense_block_generation_is_independent_of_how_it_is_called():
    """The blocked generator gives the same matrix jitted, eager-in-vmap and across calls."""
    key = jax.random.key(4)
    a, sa = pj.gaussian_matrix(key, 1234, 7000)  # several blocks plus a tail
    b, sb = jax.vmap(pj.gaussian_matrix, in_axes=(0, None, None))(key[None], 1234, 7000)
    assert np.array_equal(np.asarray(a), np.asarray(b[0]))
    np.testing.assert_allclose(np.asarray(sa), np.sum(np.asarray(a, np.float64) ** 2, 0), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(pj.SPARSE_VARIANTS))
def test_sparse_density_and_values(name):
    density, value, signed, _ = pj.SPARSE_VARIANTS[name]
    Dn, dn = 4000, 60
    proj = pj.get_projection(name)
    state = proj.init(jax.random.key(9), Dn, dn)
    M = np.asarray(state.todense())
    p = density(Dn, dn)
    nnz = np.count_nonzero(M)
    # Binomial(D d, p): within 5 standard deviations.
    assert abs(nnz - p * Dn * dn) < 5 * np.sqrt(Dn * dn * p * (1 - p)) + 1
    vals = M[M != 0]
    np.testing.assert_allclose(np.abs(vals), value(Dn, dn), rtol=1e-6)
    if signed:
        frac_pos = np.mean(vals > 0)
        assert abs(frac_pos - 0.5) < 5 * np.sqrt(0.25 / vals.size)
    else:
        assert np.all(vals > 0)


def test_default_learning_rate_rule():
    dense, unnorm = pj.get_projection("dense"), pj.get_projection("dense_unnormalized")
    assert pj.default_learning_rate(dense, 10_000, 500) == pytest.approx(0.03)
    assert pj.default_learning_rate(dense, 10_000, 1000) == pytest.approx(0.03)
    # Above the knee the parameter-space step lr * sqrt(d) stays constant.
    assert pj.default_learning_rate(dense, 10_000, 4000) == pytest.approx(0.015)
    # Divided by the expected column norm sqrt(D / d).
    assert pj.default_learning_rate(unnorm, 10_000, 100) == pytest.approx(0.03 / 10)
