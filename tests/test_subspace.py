"""theta0 + P w over Flax pytrees: flattening, layouts, training steps, vmap over seeds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_jax as sj
from subspace_jax import projections as pj
from subspace_jax.train import compile_steps, make_train_step


class TinyMLP(nn.Module):
    hidden: int = 16
    out: int = 3

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        h = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(h)


MODEL = TinyMLP()
THETA0 = MODEL.init(jax.random.key(0), jnp.ones((1, 5)))
D_TINY = 5 * 16 + 16 + 16 * 3 + 3


def test_flatten_roundtrip_and_specs():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4, jnp.bfloat16)}}
    flat, spec = sj.flatten(tree)
    assert flat.shape == (10,) and spec.size == 10
    assert [(leaf.path, leaf.shape, leaf.offset) for leaf in spec.leaves] == [
        ("a", (2, 3), 0),
        ("b/c", (4,), 6),
    ]
    back = sj.unflatten(flat, spec)
    assert back["b"]["c"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back["a"]), np.asarray(tree["a"]))
    with pytest.raises(ValueError, match="only floating-point"):
        sj.flatten({"n": jnp.arange(3)})
    with pytest.raises(ValueError, match="11 elements, the spec needs 10"):
        sj.unflatten(jnp.ones(11), spec)


@pytest.mark.parametrize(
    "name",  # the fast tier checks the default projection and the ones auto picks
    [
        n if n in ("dense", "fastfood", "sparse") else pytest.param(n, marks=pytest.mark.slow)
        for n in pj.projection_names()
    ],
)
def test_zero_w_gives_theta0_exactly(name):
    sub = sj.init_subspace(jax.random.key(1), THETA0, 7, projection=name)
    params = jax.jit(sj.to_params)(sub, sj.init_trainable(sub))
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(THETA0), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_to_params_equals_flat_reference():
    sub = sj.init_subspace(jax.random.key(2), THETA0, 9, projection="dense")
    w = jnp.asarray(np.random.default_rng(0).standard_normal(9), jnp.float32)
    params = sj.to_params(sub, w)
    P = np.asarray(pj.as_matrix(pj.get_projection("dense"), sub.proj_states[0], 9), np.float64)
    flat0, _ = sj.flatten(THETA0)
    flat, _ = sj.flatten(params)
    np.testing.assert_allclose(np.asarray(flat), np.asarray(flat0) + P @ np.asarray(w), atol=1e-5)


@pytest.mark.slow
def test_per_leaf_allocation_and_explicit_dims():
    sub = sj.init_subspace(jax.random.key(0), THETA0, 20, per_leaf=True)
    dims = [g.dim for g in sub.layout.groups]
    sizes = [g.size for g in sub.layout.groups]
    assert sum(dims) == 20 and min(dims) >= 1 and len(dims) == 4
    assert sub.layout.dim == 20
    # Proportional: the largest leaf gets the most.
    assert dims[int(np.argmax(sizes))] == max(dims)
    assert sj.allocate_dims([1, 1, 1000], 5) == [1, 1, 3]
    with pytest.raises(ValueError, match="d >= number of projected leaves"):
        sj.init_subspace(jax.random.key(0), THETA0, 3, per_leaf=True)
    explicit = {leaf.path: 2 for leaf in sj.leaf_specs(THETA0).leaves}
    sub = sj.init_subspace(jax.random.key(0), THETA0, dims=explicit, projection="orthogonal")
    assert [g.dim for g in sub.layout.groups] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="unknown leaves"):
        sj.init_subspace(jax.random.key(0), THETA0, dims={"nope": 3})


@pytest.mark.slow
def test_per_leaf_to_params_is_blockwise():
    sub = sj.init_subspace(jax.random.key(4), THETA0, 12, per_leaf=True, projection="dense")
    w = jnp.asarray(np.random.default_rng(1).standard_normal(12), jnp.float32)
    params = sj.to_params(sub, w)
    leaves0 = jax.tree_util.tree_leaves(THETA0)
    leaves = jax.tree_util.tree_leaves(params)
    proj = pj.get_projection("dense")
    for g, state in zip(sub.layout.groups, sub.proj_states, strict=True):
        (i,) = g.leaves
        P = np.asarray(pj.as_matrix(proj, state, g.dim))
        want = np.asarray(leaves0[i]).ravel() + P @ np.asarray(w[g.offset : g.offset + g.dim])
        np.testing.assert_allclose(np.asarray(leaves[i]).ravel(), want, atol=1e-5)


@pytest.mark.slow
def test_labels_frozen_and_direct():
    def label(path, leaf):
        return "direct" if path.endswith("bias") else "project"

    sub = sj.init_subspace(jax.random.key(0), THETA0, 5, labels=label)
    t = sj.init_trainable(sub)
    assert len(t.direct) == 2 and t.w.shape == (5,)
    t2 = t._replace(direct=tuple(x + 1.0 for x in t.direct))
    params = sj.to_params(sub, t2)
    np.testing.assert_allclose(
        np.asarray(params["params"]["Dense_0"]["bias"]),
        np.asarray(THETA0["params"]["Dense_0"]["bias"]) + 1.0,
    )
    frozen = sj.init_subspace(
        jax.random.key(0), THETA0, 5, labels={"params/Dense_1/kernel": "frozen"}
    )  # 16 x 3
    assert frozen.layout.groups[0].size == D_TINY - 16 * 3
    w = jnp.ones(5)
    np.testing.assert_array_equal(
        np.asarray(sj.to_params(frozen, w)["params"]["Dense_1"]["kernel"]),
        np.asarray(THETA0["params"]["Dense_1"]["kernel"]),
    )
    with pytest.raises(ValueError, match="label 'bogus'"):
        sj.init_subspace(jax.random.key(0), THETA0, 5, labels=lambda p, x: "bogus")


def test_direct_training_when_dim_is_zero():
    sub = sj.init_subspace(jax.random.key(0), THETA0, 0)
    assert sub.dim == 0 and sub.layout.groups == ()
    assert len(sj.init_trainable(sub).direct) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=-1), "dim must be >= 0"),
        (dict(dim=1.5), "dim must be an integer"),
        (
            dict(dim=D_TINY + 1, projection="orthogonal"),
            rf"d = {D_TINY + 1} is out of range .* 1..{D_TINY}",
        ),
        (dict(dim=5, projection="gaussian_typo"), "unknown projection"),
    ],
)
def test_bad_inputs_raise_value_error_before_compiling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sj.init_subspace(jax.random.key(0), THETA0, **kwargs)


def test_wrong_w_shape_is_rejected():
    sub = sj.init_subspace(jax.random.key(0), THETA0, 5)
    with pytest.raises(ValueError, match=r"w must have shape \(5,\)"):
        sj.to_params(sub, jnp.zeros(6))


def _data(n=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    teacher = rng.standard_normal((5, 3))
    y = np.argmax(np.tanh(x @ teacher) + 0.1 * rng.standard_normal((n, 3)), -1).astype(np.int32)
    return x, y


@pytest.mark.slow
def test_grad_w_equals_projected_grad_theta():
    sub = sj.init_subspace(jax.random.key(5), THETA0, 6, projection="dense")
    x, y = _data(64)

    def loss_theta(flat):
        _, spec = sj.flatten(THETA0)
        logits = MODEL.apply(sj.unflatten(flat, spec), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    w = jnp.asarray(np.random.default_rng(2).standard_normal(6) * 0.1, jnp.float32)
    gw = jax.grad(lambda w: loss_theta(sj.flatten(sj.to_params(sub, w))[0]))(w)
    g_theta = jax.grad(loss_theta)(sj.flatten(sj.to_params(sub, w))[0])
    P = np.asarray(pj.as_matrix(pj.get_projection("dense"), sub.proj_states[0], 6), np.float64)
    np.testing.assert_allclose(np.asarray(gw), P.T @ np.asarray(g_theta, np.float64), atol=1e-6)


@pytest.mark.slow
def test_train_step_does_not_recompile_and_matches_eager():
    traces = []
    step = make_train_step(MODEL.apply, optax.adam(0.05))

    def counted(*args):
        traces.append(1)
        return step(*args)

    jstep = jax.jit(counted)
    sub = sj.init_subspace(jax.random.key(0), THETA0, 8)
    t = sj.init_trainable(sub)
    opt = optax.adam(0.05).init(t)
    x, y = _data(64)
    t_e, o_e = t, opt
    for _i in range(3):
        t, opt, loss, _ = jstep(sub, t, opt, x, y)
        t_e, o_e, loss_e, _ = step(sub, t_e, o_e, x, y)
        np.testing.assert_allclose(float(loss), float(loss_e), rtol=1e-5)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(t.w), np.asarray(t_e.w), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_vmap_over_seeds_equals_python_loop():
    x, y = _data(128)
    opt = optax.adam(0.05)
    train, evaluate = compile_steps(MODEL.apply, opt)
    keys = jax.random.split(jax.random.key(7), 3)

    def init(key):
        k_model, k_proj = jax.random.split(key)
        theta0 = MODEL.init(k_model, jnp.ones((1, 5)))
        return sj.init_subspace(k_proj, theta0, 10, projection="dense")

    subs = jax.vmap(init)(keys)
    ts = jax.vmap(sj.init_trainable)(subs)
    os_ = jax.vmap(opt.init)(ts)
    for _ in range(5):
        ts, os_, losses, _ = train(subs, ts, os_, x, y)
    one_step = jax.jit(make_train_step(MODEL.apply, opt))
    for i in range(3):
        sub = init(keys[i])
        t = sj.init_trainable(sub)
        o = opt.init(t)
        for _ in range(5):
            t, o, loss, _ = one_step(sub, t, o, x, y)
        np.testing.assert_allclose(np.asarray(ts.w[i]), np.asarray(t.w), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(losses[i]), float(loss), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,per_leaf", [("dense", False), ("sparse_very", False), ("orthogonal", True)]
)
def test_end_to_end_subspace_training_reduces_loss(name, per_leaf):
    x, y = _data(512)
    model = TinyMLP(hidden=32)
    theta0 = model.init(jax.random.key(1), jnp.ones((1, 5)))
    sub = sj.init_subspace(jax.random.key(2), theta0, 40, projection=name, per_leaf=per_leaf)
    lr = pj.default_learning_rate(pj.get_projection(name), sub.num_params, 40)
    opt = optax.adam(lr)
    step = jax.jit(make_train_step(model.apply, opt))
    t = sj.init_trainable(sub)
    o = opt.init(t)
    losses = []
    rng = np.random.default_rng(0)
    for _ in range(300):
        idx = rng.integers(0, len(x), 64)
        t, o, loss, _ = step(sub, t, o, x[idx], y[idx])
        losses.append(float(loss))
    assert np.mean(losses[-30:]) < 0.7 * np.mean(losses[:10])
    assert np.all(np.isfinite(losses))
