"""Fast Walsh-Hadamard transform, ``fastfood`` and ``orthogonal_hadamard``.

Each projection is checked against an independent float64 numpy reconstruction of its formula
from the state arrays, against ``as_matrix``, and for the properties its docstring promises.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import fastfood_numpy, fwht_numpy, orthogonal_hadamard_numpy, sylvester

from subspace_jax import projections as pj
from subspace_jax.projections import _fastfood as ff
from subspace_jax.projections._hadamard import fwht, hadamard_matrix

PROJECTIONS = {
    "fastfood": pj.get_projection("fastfood"),
    "fastfood_per_block_signs": ff.fastfood(shared_signs=False),
    "orthogonal_hadamard": pj.get_projection("orthogonal_hadamard"),
}
# Few distinct sizes, shared by the tests: each new (D, d) costs a compilation of init.
# d = 1, d = D, powers of two and not; fastfood (50, 1) has 50 blocks of one coordinate,
# (777, 129) four blocks of 256 with the last one truncated; (64, 64) is orthogonal_hadamard's
# one-window case.
CASES = (
    [("fastfood", D, d) for D, d in [(1, 1), (50, 1), (300, 300), (777, 129), (1000, 300)]]
    + [("orthogonal_hadamard", D, d) for D, d in [(1, 1), (64, 64), (300, 300), (1000, 300)]]
    + [("fastfood_per_block_signs", D, d) for D, d in [(50, 1), (1000, 300)]]
)
#: The fast tier keeps the small cases (d = 1, D <= 50; a few seconds to compile each size).
CASES = [c if c[2] == 1 else pytest.param(*c, marks=pytest.mark.slow) for c in CASES]
REGISTERED = ["fastfood", "orthogonal_hadamard"]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _products(proj, state, d, w, g):
    """Jitted (as_matrix, P w, P^T g): one compilation instead of many eager op dispatches."""
    return pj.as_matrix(proj, state, d), proj.apply(state, w), proj.transpose(state, g)


def _matrix(proj, seed, D, d):
    """P (float64) for ``key(seed)``; each size compiles once (``_products`` is shared)."""
    state = proj.init(jax.random.key(seed), D, d)
    M, _, _ = _products(proj, state, d, np.zeros(d, np.float32), np.zeros(D, np.float32))
    return np.asarray(M, np.float64)


# --------------------------------------------------------------------------------------------
# Independent float64 references
# --------------------------------------------------------------------------------------------


REFERENCES = {
    "fastfood": fastfood_numpy,
    "fastfood_per_block_signs": fastfood_numpy,
    "orthogonal_hadamard": orthogonal_hadamard_numpy,
}


def _vec(seed, n):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Walsh-Hadamard transform
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n", [1, 2, 4, 8, 64, 128, 512, pytest.param(1 << 13, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("matmul_last", [False, True])
def test_fwht_matches_dense_hadamard(n, matmul_last):
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    got = np.asarray(fwht(jnp.asarray(x), matmul_last=matmul_last), np.float64)
    want = fwht_numpy(x)
    if n <= 512:
        np.testing.assert_allclose(want, x.astype(np.float64) @ sylvester(n), atol=1e-9 * n)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.sqrt(n) * np.abs(x).max() * 4)
    normed = np.asarray(fwht(jnp.asarray(x), normalize=True, matmul_last=matmul_last))
    np.testing.assert_allclose(normed, want / np.sqrt(n), atol=1e-5 * np.abs(x).max() * 4)


def test_hadamard_matrix_is_sylvester_and_orthogonal():
    for n in [1, 2, 16, 256]:
        H = hadamard_matrix(n)
        np.testing.assert_array_equal(H, sylvester(n))
        np.testing.assert_array_equal(H @ H, n * np.eye(n))


def test_fwht_keeps_batch_shape_and_rejects_bad_sizes():
    x = jnp.ones((2, 3, 16))
    assert fwht(x).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="power of two"):
        fwht(jnp.ones(12))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="scalar"):
        fwht(jnp.float32(1.0))


def test_fwht_under_jit_grad_and_vmap():
    n = 256
    x = jnp.asarray(_vec(0, n))
    c = jnp.asarray(_vec(1, n))
    H = sylvester(n)
    # d/dx <c, H x> = H^T c = H c
    g = jax.jit(jax.grad(lambda x: jnp.vdot(c, fwht(x))))(x)
    np.testing.assert_allclose(np.asarray(g), H @ np.asarray(c, np.float64), atol=1e-3)
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((4, n)), jnp.float32)
    batched = jax.vmap(fwht)(xs)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(xs, np.float64) @ H, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Both projections: the materialised matrix, transposes, adjoint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,D,d", CASES)
def test_apply_and_transpose_match_numpy_reconstruction(name, D, d):
    proj = PROJECTIONS[name]
    state = proj.init(jax.random.key(D + d), D, d)
    want = REFERENCES[name](state)
    w, g = _vec(1, d), _vec(2, D)
    M, pw, ptg = (np.asarray(a, np.float64) for a in _products(proj, state, d, w, g))
    assert M.shape == want.shape == (D, d)
    tol = 1e-5 * max(1.0, np.abs(want).max() * np.sqrt(max(D, d)))
    np.testing.assert_allclose(M, want, atol=tol)
    np.testing.assert_allclose(pw, want @ w, atol=tol * np.abs(w).max() * np.sqrt(d))
    np.testing.assert_allclose(ptg, want.T @ g, atol=tol * np.abs(g).max() * np.sqrt(D))
    # Adjoint identity <P w, g> == <w, P^T g>, evaluated in float64.
    lhs, rhs = pw @ g.astype(np.float64), w.astype(np.float64) @ ptg
    assert abs(lhs - rhs) <= 1e-5 * np.linalg.norm(pw) * np.linalg.norm(g) + 1e-12


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_hand_written_transpose_equals_autodiff_transpose(name):
    """The transpose the registry installs as the VJP agrees with JAX's own transpose of mv."""
    proj = PROJECTIONS[name]
    D, d = 1000, 300
    state = proj.init(jax.random.key(3), D, d)
    mv = ff._fastfood_mv if name.startswith("fastfood") else ff._orth_mv
    g = jnp.asarray(_vec(4, D))

    @jax.jit
    def both(state, g):
        (auto,) = jax.linear_transpose(functools.partial(mv, state), jnp.zeros(d))(g)
        return proj.transpose(state, g), auto

    mine, auto = both(state, g)
    np.testing.assert_allclose(np.asarray(mine), np.asarray(auto), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", REGISTERED)
def test_grad_is_transpose_and_vmap_over_keys_equals_loop(name):
    proj = PROJECTIONS[name]
    D, d = 1000, 300
    keys = jax.random.split(jax.random.key(5), 3)
    w, c = jnp.asarray(_vec(6, d)), jnp.asarray(_vec(7, D))

    def loss(state, w):
        return jnp.sum(jnp.sin(proj.apply(state, w)) * c)

    @jax.jit
    def over_keys(keys, w):
        states = jax.vmap(proj.init, in_axes=(0, None, None))(keys, D, d)
        pw = jax.vmap(proj.apply, in_axes=(0, None))(states, w)
        return pw, jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(states, w)

    batched, grads = over_keys(keys, w)
    for i in range(3):  # against a loop over keys and the float64 reference
        state = proj.init(keys[i], D, d)
        M = REFERENCES[name](state)
        pw = M @ np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(batched[i]), pw, atol=1e-5)
        want = M.T @ (np.cos(pw) * np.asarray(c, np.float64))
        np.testing.assert_allclose(np.asarray(grads[i]), want, atol=1e-4)
    assert not np.allclose(np.asarray(batched[0]), np.asarray(batched[1]))


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_state_bytes_and_sizes(name):
    proj = PROJECTIONS[name]
    for D, d in [(50, 3), (1000, 300), (472_610, 4_500), (472_610, 472_610)]:
        shapes = jax.eval_shape(functools.partial(proj.init, D=D, d=d), jax.random.key(0))
        nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes))
        assert nbytes == proj.state_bytes(D, d)
        assert nbytes <= 48 * D + 64  # O(D): a few arrays of about D entries
    assert proj.max_dim(1000) == 1000
    with pytest.raises(ValueError, match="d must be in"):
        proj.init(jax.random.key(0), 10, 11)


# --------------------------------------------------------------------------------------------
# Fastfood
# --------------------------------------------------------------------------------------------


def test_fastfood_sizes_and_state_layout():
    assert ff.fastfood_sizes(1000, 300) == (512, 2)
    assert ff.fastfood_sizes(1000, 1) == (1, 1000)
    assert ff.fastfood_sizes(472_610, 4_500) == (8192, 58)
    state = PROJECTIONS["fastfood_per_block_signs"].init(jax.random.key(0), 1000, 300)
    nb, n = state.gauss.shape
    perm, inv = np.asarray(state.perm), np.asarray(state.inv_perm)
    for b in range(nb):
        np.testing.assert_array_equal(np.sort(perm[b]), np.arange(n))
        np.testing.assert_array_equal(inv[b, perm[b]] - b * n, np.arange(n))
    signs = np.asarray(state.signs)
    assert signs.shape == (nb, n) and set(np.unique(signs)) == {-1.0, 1.0}
    shared = PROJECTIONS["fastfood"].init(jax.random.key(0), 1000, 300)
    assert shared.signs.shape == (1, n)


@pytest.mark.slow
def test_fastfood_unit_expected_column_norm():
    """E||P e_j||^2 = 1: the mean squared column norm over columns and keys is 1 within 2%.

    (The signs B only flip whole columns, so per-block signs give the same norms.)
    """
    proj = PROJECTIONS["fastfood"]
    for D, d in [(2000, 100), (1000, 300), (300, 300)]:
        means = [np.mean(np.sum(_matrix(proj, k, D, d) ** 2, axis=0)) for k in range(4)]
        assert np.mean(means) == pytest.approx(1.0, abs=0.02), (D, d, means)
    assert proj.column_norm(D, d) == 1.0


@pytest.mark.slow
def test_fastfood_columns_nearly_orthogonal_and_spread():
    proj = PROJECTIONS["fastfood"]
    D, d = 2000, 100
    M = _matrix(proj, 1, D, d)
    G = M.T @ M
    off = np.abs(G - np.diag(np.diag(G))).max()
    # Like Gaussian columns: off-diagonals ~ N(0, 1/D); the max of ~5000 of them ~ 4 / sqrt(D).
    assert off < 6 / np.sqrt(D)
    assert np.abs(M).max() < 7 / np.sqrt(D)
    # Blocks are independent: the block rows of one column are not copies of each other.
    assert not np.allclose(M[:128], M[128:256])


# --------------------------------------------------------------------------------------------
# Orthogonal Hadamard
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "D,d",
    [
        pytest.param(1000, 300, marks=pytest.mark.slow),
        pytest.param(5000, 50, marks=pytest.mark.slow),
        pytest.param(300, 300, marks=pytest.mark.slow),
        (64, 64),
    ],
)
def test_orthogonal_hadamard_exactly_orthonormal(D, d):
    proj = PROJECTIONS["orthogonal_hadamard"]
    P = _matrix(proj, D, D, d)
    np.testing.assert_allclose(P.T @ P, np.eye(d), atol=1e-5)
    if d == D:  # square: also P P^T = I
        np.testing.assert_allclose(P @ P.T, np.eye(D), atol=1e-5)


@pytest.mark.slow
def test_orthogonal_hadamard_columns_spread_over_all_coordinates():
    """Incoherent like a random orthogonal matrix: no column lives in a few coordinates."""
    proj = PROJECTIONS["orthogonal_hadamard"]
    D, d = 5000, 50  # not a power of two: two overlapping windows of 4096
    P = _matrix(proj, 2, D, d)
    assert np.abs(P).max() < 7 / np.sqrt(D)
    # Each column's mass is spread over the whole range, not stuck in one window.
    head = np.sum(P[: D // 2] ** 2, axis=0)
    assert np.all((head > 0.3) & (head < 0.7))
