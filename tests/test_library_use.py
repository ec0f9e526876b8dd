"""The library as other JAX code uses it: projections as values, Flax collections, bad input."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_jax as sj
from subspace_jax import projections as pj
from subspace_jax.projections._base import _REGISTRY, _lookup
from subspace_jax.projections._fastfood import fastfood


@pytest.fixture
def scratch_names():
    """Names registered by a test, removed afterwards (the registry is global)."""
    names = []
    yield names
    for name in names:
        _REGISTRY.pop(name, None)
    _lookup.cache_clear()


THETA0 = {"params": {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}}


def _gaussian_init(key, D, d):
    return jax.random.normal(key, (D, d)) / jnp.sqrt(D)


# --------------------------------------------------------------------------------------------
# Projections as values
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_projection_object_reaches_factory_options():
    per_block = fastfood(shared_signs=False)
    sub = sj.init_subspace(jax.random.key(0), THETA0, 3, projection=per_block)
    assert sub.layout.groups[0].projection is per_block
    n, nb = 4, 4  # n = 2^ceil(log2 3), ceil(16 / 4) blocks
    assert sub.proj_states[0].signs.shape == (nb, n)  # one B per block, not shared
    shared = sj.init_subspace(jax.random.key(0), THETA0, 3, projection="fastfood")
    assert shared.proj_states[0].signs.shape == (1, n)
    # The registered object itself is recorded by name (layouts stay comparable and savable).
    again = sj.init_subspace(jax.random.key(0), THETA0, 3, projection=pj.get_projection("dense"))
    assert again.layout.groups[0].projection == "dense"
    w = jnp.asarray([0.3, -0.2, 0.5])
    M = np.asarray(pj.as_matrix(per_block, sub.proj_states[0], 3), np.float64)
    got = np.asarray(sj.flatten(sj.to_params(sub, w))[0], np.float64)
    want = np.asarray(sj.flatten(THETA0)[0], np.float64) + M @ np.float64(w)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_register_twice_needs_overwrite(scratch_names):
    scratch_names.append("test_ff_blocks")
    sj.register("test_ff_blocks", fastfood(shared_signs=False))
    first = sj.get_projection("test_ff_blocks")
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        sj.register("test_ff_blocks", fastfood)
    sj.register("test_ff_blocks", fastfood, overwrite=True)  # re-running a notebook cell
    assert sj.get_projection("test_ff_blocks") is not first
    assert "test_ff_blocks" in sj.projection_names()
    with pytest.raises(ValueError, match="needs a Projection or a function"):
        sj.register("test_ff_blocks", 3, overwrite=True)


@pytest.mark.slow
def test_minimal_custom_projection_trains_and_differentiates(scratch_names):
    mine = sj.make_projection(
        "test_mine", init=_gaussian_init, mv=lambda M, w: M @ w, rmv=lambda M, g: g @ M
    )
    assert mine.column_norm(16, 3) == 1.0 and mine.max_dim(16) == 16
    assert mine.state_bytes(16, 3) == 16 * 3 * 4  # from the shapes init returns
    scratch_names.append("test_mine")
    sj.register("test_mine", mine)
    for projection in (mine, "test_mine"):
        sub = sj.init_subspace(jax.random.key(1), THETA0, 3, projection=projection)
        M = np.asarray(sub.proj_states[0], np.float64)
        w, v = jnp.asarray([0.1, 0.2, -0.3]), jnp.asarray([1.0, 0.0, 2.0])

        def flat(w, sub=sub):
            return sj.flatten(sj.to_params(sub, w))[0]

        _, t = jax.jvp(flat, (w,), (v,))
        np.testing.assert_allclose(np.asarray(t), M @ np.float64(v), atol=1e-6)
        g = jax.grad(lambda w, flat=flat: jnp.sum(flat(w) ** 2))(w)
        theta = np.asarray(sj.flatten(THETA0)[0], np.float64) + M @ np.float64(w)
        np.testing.assert_allclose(np.asarray(g), 2 * M.T @ theta, atol=1e-5)
    with pytest.raises(ValueError, match=r"d must be in \[1, 16\]"):
        mine.init(jax.random.key(0), 16, 17)
    # A Projection built directly (4 fields) works too, differentiated by JAX's autodiff.
    direct = pj.Projection("test_direct", _gaussian_init, lambda M, w: M @ w, lambda M, g: g @ M)
    assert direct.state_bytes(16, 3) == 16 * 3 * 4 and direct.description == ""
    sub = sj.init_subspace(jax.random.key(1), THETA0, 3, projection=direct)
    assert jax.jacfwd(lambda w: sj.flatten(sj.to_params(sub, w))[0])(jnp.zeros(3)).shape == (
        16,
        3,
    )


def test_top_level_exports():
    assert sj.register is pj.register and sj.make_projection is pj.make_projection
    with pytest.raises(ValueError, match="registered name or a Projection"):
        sj.init_subspace(jax.random.key(0), THETA0, 3, projection=3)


# --------------------------------------------------------------------------------------------
# Flax variables with other collections: a BatchNorm CNN
# --------------------------------------------------------------------------------------------


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(3)(x)


@pytest.mark.slow
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_batchnorm_cnn_trains_params_in_the_subspace_and_updates_batch_stats():
    model = BNNet()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 6, 6, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    variables = model.init(jax.random.key(0), x, train=False)
    sub = sj.init_subspace(jax.random.key(1), variables, 10)
    assert set(sub.theta0) == {"params"} and set(sub.other_collections) == {"batch_stats"}
    assert not any("batch_stats" in p for p in sub.layout.spec.paths)
    trainable = sj.init_trainable(sub)
    opt = optax.adam(0.05)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(sub, trainable, opt_state, batch_stats, x, y):
        def loss(tr):
            v = sj.to_params(sub, tr, {"batch_stats": batch_stats})
            logits, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, upd["batch_stats"]

        (value, new_stats), g = jax.value_and_grad(loss, has_aux=True)(trainable)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(trainable, updates), opt_state, new_stats, value

    stats = sub.other_collections["batch_stats"]
    losses = []
    for _ in range(5):
        before = stats
        trainable, opt_state, stats, value = step(sub, trainable, opt_state, stats, x, y)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    # batch_stats moved the way Flax moves them: one more step's update from `before`.
    v = sj.to_params(sub, trainable, {"batch_stats": before})
    mean0 = np.asarray(before["BatchNorm_0"]["mean"])
    assert not np.allclose(np.asarray(stats["BatchNorm_0"]["mean"]), 0.0)
    assert not np.allclose(np.asarray(stats["BatchNorm_0"]["var"]), 1.0)
    assert mean0.shape == (4,)
    # The params moved only within theta0 + span(P); the batch_stats were never projected.
    full = sj.to_params(sub, trainable, {"batch_stats": stats})
    np.testing.assert_array_equal(
        np.asarray(full["batch_stats"]["BatchNorm_0"]["var"]),
        np.asarray(stats["BatchNorm_0"]["var"]),
    )
    default = sj.to_params(sub, trainable)
    np.testing.assert_array_equal(
        np.asarray(default["batch_stats"]["BatchNorm_0"]["var"]),
        np.asarray(variables["batch_stats"]["BatchNorm_0"]["var"]),
    )
    M = np.asarray(pj.as_matrix(pj.get_projection("dense"), sub.proj_states[0], 10), np.float64)
    delta = np.asarray(sj.flatten(v["params"])[0], np.float64) - np.asarray(
        sj.flatten(variables["params"])[0], np.float64
    )
    coef, *_ = np.linalg.lstsq(M, delta, rcond=None)
    assert np.linalg.norm(delta) > 1e-2
    np.testing.assert_allclose(M @ coef, delta, atol=1e-5)
    np.testing.assert_allclose(coef, np.asarray(trainable.w), atol=1e-4)
    # The eval-mode model uses the trained running statistics.
    logits = model.apply(full, x, train=False)
    assert logits.shape == (16, 3) and np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.slow
def test_collections_options_and_errors():
    variables = {"params": THETA0["params"], "batch_stats": {"m": jnp.zeros(4)}}
    everything = sj.init_subspace(jax.random.key(0), variables, 3, collections=None)
    assert "batch_stats/m" in everything.layout.spec.paths and everything.other_collections == {}
    with pytest.raises(ValueError, match=r"\['cache'\] not in the variables"):
        sj.init_subspace(jax.random.key(0), variables, 3, collections=("params", "cache"))
    sub = sj.init_subspace(jax.random.key(0), variables, 3)
    with pytest.raises(ValueError, match="not pass-through collections"):
        sj.to_params(sub, jnp.zeros(3), {"params": THETA0["params"]})
    # vmap over keys: one subspace per key, the other collections carried along.
    subs = jax.vmap(lambda k: sj.init_subspace(k, variables, 3))(
        jax.random.split(jax.random.key(0), 2)
    )
    out = jax.vmap(sj.to_params)(subs, jnp.ones((2, 3)))
    assert out["batch_stats"]["m"].shape == (2, 4) and out["params"]["a"].shape == (2, 3, 4)


# --------------------------------------------------------------------------------------------
# Bad input at the library boundary: one clear ValueError each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=3, labels={"params/A": "frozen"}), r"unknown leaves \['params/A'\]; leaves are"),
        (dict(dim=3, dims={"params/a": 2, "params/b": 1}), "either dim .* or dims"),
        (dict(), "give the subspace dimension"),
        (dict(dims={"params/a": 0, "params/b": 1}), "d = 0 is out of range for params/a"),
        (dict(dims={"params/a": 2}), r"no dimension for projected leaves \['params/b'\]"),
        (dict(dims={"params/a": 2.0, "params/b": 1}), "dims\\['params/a'\\] must be an integer"),
        (dict(dim=3, labels=[1]), "labels must be a mapping"),
        (dict(dim=0, labels={"params/A": "frozen"}), r"unknown leaves \['params/A'\]"),
        (dict(dim=3, labels=lambda path, leaf: "frozen"), "no leaf is labelled 'project'"),
    ],
)
def test_bad_layout_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sj.init_subspace(jax.random.key(0), THETA0, **kwargs)


@pytest.mark.slow
def test_numpy_integers_are_dims():
    sub = sj.init_subspace(jax.random.key(0), THETA0, np.int64(3))
    assert sub.dim == 3
    sub = sj.init_subspace(jax.random.key(0), THETA0, dims={"params/a": np.int32(2), "params/b": 1})
    assert [g.dim for g in sub.layout.groups] == [2, 1]


def test_to_params_checks_the_trainable():
    sub = sj.init_subspace(
        jax.random.key(0), THETA0, 3, labels={"params/b": "direct"}, projection="dense"
    )
    t = sj.init_trainable(sub)
    good = sj.to_params(sub, t)
    assert good["params"]["b"].shape == (4,)
    bad = [
        (t._replace(direct=(jnp.zeros(5),)), r"direct leaf 'params/b' must have shape \(4,\)"),
        (t._replace(direct=(jnp.zeros(4, jnp.int32),)), "must be floating point"),
        (t._replace(direct=()), "tuple of the 1 directly trained leaves"),
        (t._replace(w=jnp.zeros(3, jnp.int32)), "w must be floating point"),
        (t._replace(w=jnp.zeros(4)), r"w must have shape \(3,\)"),
        (t._replace(scales=jnp.ones(2)), r"scales \(SAID\) must have shape \(0,\)"),
        ((t.w, t.direct), "must be a Trainable"),
        # The dict of earlier versions is still read, and checked the same way.
        ({"direct": t.direct}, r"got a dict with keys \['direct'\]"),
        ({"w": t.w, "direct": t.direct, "extra": 1}, "got a dict with keys"),
        ({"w": t.w, "direct": ()}, "tuple of the 1 directly trained leaves"),
    ]
    for trainable, match in bad:
        with pytest.raises(ValueError, match=match):
            sj.to_params(sub, trainable)


class _Opaque:
    pass


@pytest.mark.parametrize("leaf", [lambda x: x, _Opaque()], ids=["function", "object"])
def test_non_array_leaves_say_how_to_partition(leaf):
    # What a whole equinox module flattens to: arrays plus functions / objects.
    tree = {"weight": jnp.ones(3), "activation": leaf}
    with pytest.raises(ValueError, match=r"'activation' is a .*not an array.*eqx\.partition"):
        sj.init_subspace(jax.random.key(0), tree, 2)


# --------------------------------------------------------------------------------------------
# flax nnx: the state of nnx.split
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nnx_split_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    sub = sj.init_subspace(jax.random.key(1), state, 4, projection="fastfood")
    w = jnp.asarray([0.5, -0.1, 0.2, 0.3])
    merged = nnx.merge(graphdef, sj.to_params(sub, w))
    x = jnp.asarray([[1.0, 2.0, -1.0]])
    M = np.asarray(pj.as_matrix(pj.get_projection("fastfood"), sub.proj_states[0], 4), np.float64)
    delta = M @ np.float64(w)
    paths = sub.layout.spec.paths
    k0, b0 = np.asarray(model.kernel[...], np.float64), np.asarray(model.bias[...], np.float64)
    spec = {leaf.path: leaf for leaf in sub.layout.spec.leaves}
    kernel = k0 + delta[spec[_find(paths, "kernel")].offset :][: k0.size].reshape(k0.shape)
    bias = b0 + delta[spec[_find(paths, "bias")].offset :][: b0.size]
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(x) @ kernel + bias, atol=1e-5)
    # Forward mode through nnx.merge works too.
    _, t = jax.jvp(lambda w: nnx.merge(graphdef, sj.to_params(sub, w))(x), (w,), (w,))
    np.testing.assert_allclose(
        np.asarray(t),
        np.asarray(x) @ (kernel - k0) + (bias - b0),
        atol=1e-5,
    )


def _find(paths, name):
    (hit,) = [p for p in paths if name in p.split("/")]
    return hit


@pytest.mark.slow
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_readme_forward_mode_and_batchnorm_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "BNNet" in b]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["tangent"].shape == (128, 2) and namespace["ntk_row"].shape == (2, 40)
    assert float(namespace["value"]) < 0.5  # trained: chance is log 2 = 0.69
    stats = namespace["stats"]["BatchNorm_0"]["mean"]
    assert not jnp.allclose(stats, 0.0)  # the running statistics were updated
    assert "loss" in capsys.readouterr().out
