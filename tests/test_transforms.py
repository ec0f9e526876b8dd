"""Every JAX transformation through every registered projection and through ``to_params``.

The reference matrix of each projection is built from its hand-written transpose alone
(``transpose`` applied to the identity's rows, no autodiff and no ``apply``), in float64; then
``jvp``, ``linearize``, ``jacfwd``, ``jacrev``, ``linear_transpose``, ``vmap`` and Hessian-vector
products (forward-over-reverse and reverse-over-reverse) of ``apply`` are each checked against
it. Projections compute in float32, so tolerances are relative to the float32 rounding of
``|P| |v|``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_jax as sj
from subspace_jax import projections as pj

NAMES = pj.projection_names()
D, d = 48, 6


#: Fast tier: the default projection and the ones ``auto`` picks; the others are slow-tier.
FAST_TIER = ("dense", "fastfood", "sparse")


def _tiered(name, *rest):
    return pytest.param(name, *rest, marks=() if name in FAST_TIER else pytest.mark.slow)


@pytest.fixture(scope="module", params=[_tiered(n) for n in NAMES])
def built(request):
    """(projection, state, reference float64 P of shape (D, d) from ``transpose`` only)."""
    proj = pj.get_projection(request.param)
    state = proj.init(jax.random.key(3), D, d)
    rows = jax.jit(jax.vmap(proj.transpose, (None, 0)))(state, jnp.eye(D, dtype=jnp.float32))
    return proj, state, np.asarray(rows, np.float64)


def _vec(seed, n):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(n), jnp.float32)


def _close(got, want, scale, tol=2e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol * scale + 1e-30)


def test_jvp_linearize_jacfwd_jacrev_match_the_matrix(built):
    proj, state, M = built
    w, v = _vec(0, d), _vec(1, d)
    scale = np.abs(M).max() * d

    @jax.jit
    def all_of_them(state, w, v):
        def f(w):
            return proj.apply(state, w)

        y, ty = jax.jvp(f, (w,), (v,))
        _, lin = jax.linearize(f, w)
        return y, ty, lin(v), jax.jacfwd(f)(w), jax.jacrev(f)(w)

    y, ty, lv, jf, jr = all_of_them(state, w, v)
    _close(y, M @ np.float64(w), scale)
    _close(ty, M @ np.float64(v), scale)
    _close(lv, M @ np.float64(v), scale)
    _close(jf, M, scale)
    _close(jr, M, scale)
    np.testing.assert_allclose(np.asarray(jf), np.asarray(jr), rtol=0, atol=1e-6 * scale)


def test_linear_transpose_is_the_hand_written_transpose(built):
    proj, state, M = built
    g = _vec(2, D)
    (gw,) = jax.linear_transpose(lambda w: proj.apply(state, w), jnp.zeros(d))(g)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(proj.transpose(state, g)), atol=1e-6)
    _close(gw, M.T @ np.float64(g), np.abs(M).max() * D)
    # The transpose of the transpose is the map again.
    (back,) = jax.linear_transpose(
        lambda g: jax.linear_transpose(lambda w: proj.apply(state, w), jnp.zeros(d))(g)[0],
        jnp.zeros(D),
    )(_vec(3, d))
    _close(back, M @ np.float64(_vec(3, d)), np.abs(M).max() * d)


def test_hvp_forward_over_reverse_equals_reverse_over_reverse(built):
    proj, state, M = built
    w, v = _vec(4, d) * 0.1, _vec(5, d)
    c = np.abs(M).max() * np.sqrt(D)  # keeps sin's argument of order one for any column norm

    def loss(w):
        return jnp.sum(jnp.sin(proj.apply(state, w) / c))

    @jax.jit
    def hvps(w, v):
        fwd_rev = jax.jvp(jax.grad(loss), (w,), (v,))[1]
        rev_rev = jax.grad(lambda w: jnp.vdot(jax.grad(loss)(w), v))(w)
        return fwd_rev, rev_rev, jax.hessian(loss)(w)

    fwd_rev, rev_rev, hess = hvps(w, v)
    Mc = M / c
    want_h = Mc.T @ (-np.sin(Mc @ np.float64(w))[:, None] * Mc)
    scale = np.abs(want_h).max() * d + np.abs(Mc).max() ** 2 * D
    _close(hess, want_h, scale, tol=1e-5)
    _close(fwd_rev, want_h @ np.float64(v), scale * d, tol=1e-5)
    _close(rev_rev, want_h @ np.float64(v), scale * d, tol=1e-5)


@pytest.mark.slow
def test_vmap_over_keys_of_jvp_and_vjp_equals_a_loop(built):
    proj, _, _ = built
    keys = jax.random.split(jax.random.key(7), 3)
    states = jax.vmap(proj.init, in_axes=(0, None, None))(keys, D, d)
    v, g = _vec(8, d), _vec(9, D)

    def both(state, v, g):
        _, t = jax.jvp(lambda w: proj.apply(state, w), (jnp.zeros(d),), (v,))
        _, pull = jax.vjp(lambda w: proj.apply(state, w), jnp.zeros(d))
        return t, pull(g)[0]

    ts, gs = jax.jit(jax.vmap(both, in_axes=(0, None, None)))(states, v, g)
    apply, transpose = jax.jit(proj.apply), jax.jit(proj.transpose)
    for k in range(3):
        state = proj.init(keys[k], D, d)
        np.testing.assert_allclose(ts[k], apply(state, v), rtol=1e-5, atol=1e-5 * D)
        np.testing.assert_allclose(gs[k], transpose(state, g), rtol=1e-5, atol=1e-5 * D)


# --------------------------------------------------------------------------------------------
# Through to_params: global and per-leaf subspaces of a small Flax model
# --------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.tanh(nn.Dense(4)(x)))


THETA0 = Tiny().init(jax.random.key(0), jnp.ones((1, 3)))
NUM = sj.leaf_specs(THETA0).size  # 3*4 + 4 + 4*2 + 2 = 26


@jax.jit
def _group_rows(sub):
    """Each group's P^T applied to the identity's rows (one compile for all groups)."""
    return tuple(
        jax.vmap(pj.get_projection(g.projection).transpose, (None, 0))(
            state, jnp.eye(g.size, dtype=jnp.float32)
        )
        for g, state in zip(sub.layout.groups, sub.proj_states, strict=True)
    )


def _reference_matrix(sub):
    """The (D, d) matrix of w -> flatten(to_params(sub, w)) from each group's transpose."""
    M = np.zeros((NUM, sub.dim))
    for g, rows in zip(sub.layout.groups, _group_rows(sub), strict=True):
        start = 0
        for i in g.leaves:
            leaf = sub.layout.spec.leaves[i]
            M[leaf.offset : leaf.offset + leaf.size, g.offset : g.offset + g.dim] = np.asarray(
                rows[start : start + leaf.size], np.float64
            )
            start += leaf.size
    return M


#: Per-leaf subspaces of these run by default (fast tier), of the others with the slow tests.
PER_LEAF_DEFAULT = ("dense",)
CASES = [_tiered(name, False) for name in NAMES] + [
    pytest.param(name, True, marks=() if name in PER_LEAF_DEFAULT else pytest.mark.slow)
    for name in NAMES
]


@jax.jit
def _transforms_through_to_params(sub, w, v, c):
    """jvp, jacfwd, jacrev of w -> flat params; fwd-over-rev and rev-over-rev HVPs of a loss."""

    def flat(w):
        return sj.flatten(sj.to_params(sub, w))[0]

    def loss(w):  # sum_i sin(theta_i / c): its Hessian in theta is diagonal
        return jnp.sum(jnp.sin(flat(w) / c))

    y, t = jax.jvp(flat, (w,), (v,))
    fwd_rev = jax.jvp(jax.grad(loss), (w,), (v,))[1]
    rev_rev = jax.grad(lambda w: jnp.vdot(jax.grad(loss)(w), v))(w)
    return y, t, jax.jacfwd(flat)(w), jax.jacrev(flat)(w), fwd_rev, rev_rev


@pytest.mark.parametrize("name, per_leaf", CASES)
@pytest.mark.slow
def test_to_params_under_forward_and_reverse_mode(name, per_leaf):
    sub = sj.init_subspace(jax.random.key(1), THETA0, 8, projection=name, per_leaf=per_leaf)
    M = _reference_matrix(sub)
    flat0 = np.asarray(sj.flatten(THETA0)[0], np.float64)
    w, v = _vec(10, 8) * 0.01, _vec(11, 8)
    scale = np.abs(M).max() * 8
    c = 1.0 + np.abs(M).max() * 8  # keeps sin's argument of order one for any column norm
    y, t, jf, jr, fwd_rev, rev_rev = _transforms_through_to_params(sub, w, v, jnp.float32(c))
    theta = flat0 + M @ np.float64(w)
    _close(y, theta, scale + np.abs(flat0).max(), tol=1e-6)
    _close(t, M @ np.float64(v), scale)
    _close(jf, M, scale)
    _close(jr, M, scale)
    # Hessian-vector product: M^T diag(-sin(theta / c) / c^2) M v, forward-over-reverse and
    # reverse-over-reverse.
    want = M.T @ (-np.sin(theta / c) / c**2 * (M @ np.float64(v)))
    hscale = (np.abs(M).max() ** 2 * NUM * np.abs(np.float64(v)).sum()) / c**2
    _close(fwd_rev, want, hscale, tol=1e-5)
    _close(rev_rev, want, hscale, tol=1e-5)


def test_transformed_step_does_not_recompile():
    sub = sj.init_subspace(jax.random.key(0), THETA0, 8, projection="fastfood")
    traces = []

    @jax.jit
    def jvp_step(w, v, sub):
        traces.append(1)
        return jax.jvp(lambda w: sj.flatten(sj.to_params(sub, w))[0], (w,), (v,))

    for k in range(3):
        jvp_step(_vec(k, 8), _vec(k + 1, 8), sub)
    other = sj.init_subspace(jax.random.key(5), THETA0, 8, projection="fastfood")
    jvp_step(_vec(0, 8), _vec(1, 8), other)
    assert len(traces) == 1


@pytest.mark.slow
def test_state_only_tangent_wrong_way_transpose_and_w_dtype(standard_dtype_promotion):
    """The map is constant in the state (zero derivative), linear in w only, and w's dtype is
    kept by its cotangent (a bf16 w with a float32 state gets a bf16 gradient)."""
    proj = pj.get_projection("dense")
    state = proj.init(jax.random.key(0), 12, 3)
    w = jnp.arange(3.0)
    J = jax.jacfwd(lambda s: proj.apply(s, w))(state)
    assert not np.asarray(J.matrix).any() and not np.asarray(J.scale).any()
    wb = jnp.ones(3, jnp.bfloat16)
    g = jax.grad(lambda v: jnp.sum(proj.apply(state, v).astype(jnp.float32)))(wb)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(g, np.float64),
        np.asarray(pj.as_matrix(proj, state, 3), np.float64).sum(axis=0),
        rtol=1e-2,
    )
    t = jax.linear_transpose(lambda s, v: proj.apply(s, v), state, w)
    with pytest.raises(ValueError, match="linear in w only"):
        t(jnp.ones(12))
