"""The typed trainable (fixed structure, copies, checks), default_learning_rate(sub) and the
dtype policy for bf16 / f16 parameters."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import subspace_jax as sj
from subspace_jax import projections as pj

THETA0 = {
    "params": {
        "a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 10,
        "b": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32),
    }
}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 3},
        {"dim": 0},
        {"dim": 5, "said": True},
        {"dim": 2, "labels": {"params/b": "direct"}},
        {"dims": {"params/a": 2, "params/b": 1}},
    ],
)
def test_trainable_has_one_structure_for_every_layout(kwargs):
    sub = sj.init_subspace(jax.random.key(0), THETA0, **kwargs)
    t = sj.init_trainable(sub)
    assert type(t) is sj.Trainable and t._fields == ("w", "direct", "scales")
    lay = sub.layout
    assert t.w.shape == (lay.dim,) and t.w.dtype == jnp.float32
    assert t.scales.shape == (lay.num_scales,) and t.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(t.scales), 1.0)
    assert isinstance(t.direct, tuple) and len(t.direct) == len(lay.direct_leaves)
    # The start point is theta0, bit for bit.
    got = jax.tree_util.tree_leaves(sj.to_params(sub, t))
    for x, y in zip(got, jax.tree_util.tree_leaves(THETA0), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    # optax and tree utilities see the same tree structure for every subspace of the layout.
    state = optax.adam(0.1).init(t)
    assert jax.tree_util.tree_structure(state[0].mu) == jax.tree_util.tree_structure(t)


@pytest.mark.parametrize("jit", [False, True])
def test_direct_leaves_are_copies_that_survive_donation(jit):
    sub = sj.init_subspace(jax.random.key(0), THETA0, 2, labels={"params/b": "direct"})
    before = np.asarray(sub.theta0["params"]["b"]).copy()
    init = jax.jit(sj.init_trainable) if jit else sj.init_trainable
    t = init(sub)
    leaf = t.direct[0]
    assert leaf.unsafe_buffer_pointer() != sub.theta0["params"]["b"].unsafe_buffer_pointer()
    step = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 1.0, t), donate_argnums=0)
    t2 = step(t)
    # theta0 is intact and usable after its trainable copy was donated.
    np.testing.assert_array_equal(np.asarray(sub.theta0["params"]["b"]), before)
    np.testing.assert_array_equal(np.asarray(t2.direct[0]), before + 1.0)
    np.testing.assert_array_equal(np.asarray(sj.to_params(sub, t2)["params"]["b"]), before + 1)


@pytest.mark.slow
def test_init_trainable_vmaps_over_a_batch_of_subspaces():
    keys = jax.random.split(jax.random.key(0), 3)
    subs = jax.vmap(
        lambda k: sj.init_subspace(k, THETA0, 4, said=True, labels={"params/b": "direct"})
    )(keys)
    ts = jax.vmap(sj.init_trainable)(subs)
    assert ts.w.shape == (3, 3) and ts.scales.shape == (3, 1) and ts.direct[0].shape == (3, 4)
    theta0_b = subs.theta0["params"]["b"]
    assert ts.direct[0].unsafe_buffer_pointer() != theta0_b.unsafe_buffer_pointer()


def test_to_params_reads_the_dict_of_earlier_versions():
    sub = sj.init_subspace(jax.random.key(0), THETA0, 4, said=True)
    w = jnp.arange(2, dtype=jnp.float32) / 7  # d = 4 counts the m = 2 scales
    t = sj.Trainable(w=w, direct=(), scales=jnp.full((2,), 2.0, jnp.float32))
    old = {"w": w, "direct": (), "said": jnp.full((2,), 2.0, jnp.float32)}
    a, b = sj.to_params(sub, t), sj.to_params(sub, old)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), a, b))
    # Just w: SAID scales of one.
    c = sj.to_params(sub, w)
    d = sj.to_params(sub, t._replace(scales=jnp.ones((2,), jnp.float32)))
    np.testing.assert_array_equal(np.asarray(sj.flatten(c)[0]), np.asarray(sj.flatten(d)[0]))


# ------------------------------------------------------------------ default learning rate


@pytest.mark.slow
def test_default_learning_rate_of_a_subspace_matches_the_projection_rule():
    theta0 = {"params": {"a": jnp.zeros((60, 30)), "b": jnp.zeros(30)}}
    sub = sj.init_subspace(jax.random.key(0), theta0, 50, projection="dense")
    want = pj.default_learning_rate(pj.get_projection("dense"), 1830, 50)
    assert sj.default_learning_rate(sub) == want == pytest.approx(0.03)
    assert sj.default_learning_rate(sub.layout) == want
    # Per leaf, with unnormalised columns (norm sqrt(D_g / d_g)): the dimension-weighted
    # geometric mean of the groups' column norms, and the knee of the total d.
    per = sj.init_subspace(
        jax.random.key(0), theta0, 1500, projection="dense_unnormalized", per_leaf=True
    )
    sizes = np.array([g.size for g in per.layout.groups], float)
    dims = np.array([g.dim for g in per.layout.groups], float)
    norm = np.exp(np.sum(dims * np.log(np.sqrt(sizes / dims))) / dims.sum())
    want = 0.03 / norm * np.sqrt(1000 / 1500)
    assert sj.default_learning_rate(per) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="projects no leaf"):
        sj.default_learning_rate(sj.init_subspace(jax.random.key(0), theta0, 0))
    with pytest.raises(ValueError, match="needs the sizes D and d"):
        sj.default_learning_rate(pj.get_projection("dense"))
    with pytest.raises(ValueError, match="takes no sizes"):
        sj.default_learning_rate(sub, 10, 2)
    with pytest.raises(ValueError, match="takes a Projection"):
        sj.default_learning_rate("dense")


# ---------------------------------------------------------------------------- dtype policy

NARROW = [(jnp.bfloat16, ml_dtypes.bfloat16), (jnp.float16, np.float16)]


@pytest.mark.parametrize(("dtype", "np_dtype"), NARROW)
def test_projected_narrow_leaves_are_summed_in_float32_and_rounded_once(dtype, np_dtype):
    theta0 = {"k": (jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 9 + 1).astype(dtype)}
    sub = sj.init_subspace(jax.random.key(3), theta0, 6, projection="dense")
    w = jnp.asarray(np.random.default_rng(0).standard_normal(6) * 1e-3, jnp.float32)
    got = sj.to_params(sub, w)["k"]
    assert got.dtype == dtype
    delta = np.asarray(pj.get_projection("dense").apply(sub.proj_states[0], w), np.float32)
    want = (np.asarray(theta0["k"], np.float32).ravel() + delta).astype(np_dtype).reshape(8, 8)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))
    # Gradients reach w in float32.
    g = jax.grad(lambda w: jnp.sum(sj.to_params(sub, w)["k"].astype(jnp.float32)))(w)
    assert g.dtype == jnp.float32 and g.shape == (6,)


def _sgd_steps(sub, t, steps, size):
    """``steps`` plain SGD steps that each raise every parameter by ``size``."""

    def loss(t):
        leaves = jax.tree_util.tree_leaves(sj.to_params(sub, t))
        return -sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)

    opt = optax.sgd(size)

    @jax.jit
    def step(t, s):
        g = jax.grad(loss)(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s

    s = opt.init(t)
    for _ in range(steps):
        t, s = step(t, s)
    return t


@pytest.mark.parametrize(("dtype", "np_dtype"), NARROW)
def test_small_updates_accumulate_in_the_float32_master_copy(dtype, np_dtype):
    theta0 = {"k": jnp.ones((3, 4), dtype)}
    sub = sj.init_subspace(jax.random.key(0), theta0, 0)  # every leaf trained directly
    # Each step adds 1e-3, less than half an ulp of 1.0 in bf16 (2**-8) and ... f16 (2**-11)
    # only for bf16; f16 gets 2e-4 (half an ulp: 2**-11 ~ 4.9e-4).
    size = 1e-3 if dtype == jnp.bfloat16 else 2e-4
    steps = 100
    t = sj.init_trainable(sub)
    assert t.direct[0].dtype == jnp.float32  # the master copy
    params = sj.to_params(sub, _sgd_steps(sub, t, steps, size))["k"]
    assert params.dtype == dtype
    want = np.asarray(np.float32(1.0) + np.float32(steps * size)).astype(np_dtype)
    np.testing.assert_allclose(np.asarray(params, np.float64), float(want), rtol=2e-3)
    # Without a master copy (documented): each update is rounded away in the leaf's dtype.
    t = sj.init_trainable(sub, master_dtype=None)
    assert t.direct[0].dtype == dtype
    lost = sj.to_params(sub, _sgd_steps(sub, t, steps, size))["k"]
    np.testing.assert_array_equal(np.asarray(lost, np.float32), 1.0)


@pytest.mark.slow
def test_small_updates_of_w_reach_narrow_parameters():
    theta0 = {"k": jnp.ones((16,), jnp.bfloat16)}
    sub = sj.init_subspace(jax.random.key(1), theta0, 4, projection="orthogonal")
    t = _sgd_steps(sub, sj.init_trainable(sub), 50, 1e-3)
    got = np.asarray(sj.to_params(sub, t)["k"], np.float64)
    P = np.asarray(pj.as_matrix(pj.get_projection("orthogonal"), sub.proj_states[0], 4))
    want = 1.0 + P.astype(np.float64) @ np.asarray(t.w, np.float64)
    assert np.abs(want - 1.0).max() > 0.02  # the updates moved theta by several bf16 ulps
    np.testing.assert_allclose(got, want, atol=2**-7)  # within one bf16 ulp (at 1..2)
