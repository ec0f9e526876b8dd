"""Tests for subspace_jax.models: exact sizes, shapes, purity, rebuild from config, validation."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subspace_jax.models import (
    DEFAULT_GRID_TARGETS,
    GRID_MODELS,
    MLP,
    MODELS,
    LeNet,
    build_model,
    count_params,
    from_config,
    lenet_spatial_sizes,
    model_names,
    small_model_grid,
)

MNIST = (28, 28, 1)


def _leaf_count(tree) -> int:
    """Independent of count_params: product of each leaf's shape, summed."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(tree)))


def _abstract_init(module, input_shape):
    """The init'd variables' shapes, traced without compiling (flax init is slow to compile)."""
    return jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    )


@functools.cache
def _built(name: str):
    """Each registered model on MNIST with its params for key 0, initialised once per session.

    Eager init compiles one random sampler per distinct kernel shape; later inits of the same
    shapes (e.g. a model rebuilt from its config) reuse those compilations.
    """
    model = build_model(name, MNIST, 10)
    return model, model.init(jax.random.key(0))


def _random_params(model, seed: int):
    """float32 parameters with the model's tree, drawn by numpy (non-zero biases)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(max(1, s.shape[0])), s.dtype),
        shapes,
    )
    if "batch_stats" in params:  # running variances positive and away from 0 (scale ~ 1)
        params = {
            **params,
            "batch_stats": jax.tree_util.tree_map(lambda a: 1 + jnp.abs(a), params["batch_stats"]),
        }
    return params


# ------------------------------------------------------------------------ exact parameter counts


@pytest.mark.parametrize(
    "hidden, input_shape, expected",
    [
        ((200,), (28, 28, 1), 159_010),  # 785*200 + 201*10
        ((200,), (28, 28, 3), 472_610),  # 2353*200 + 201*10 (CIFAR-10 cropped to 28x28)
        ((200, 200), (28, 28, 1), 199_210),  # 785*200 + 201*200 + 201*10
    ],
)
def test_mlp_exact_param_count(hidden, input_shape, expected):
    variables = _abstract_init(MLP(hidden=hidden, num_classes=10), input_shape)
    assert _leaf_count(variables) == expected


@pytest.mark.parametrize(
    "input_shape, expected",
    [
        ((32, 32, 1), 61_706),  # 156 + 2416 + 401*120 + 121*84 + 85*10
        ((32, 32, 3), 62_006),  # 456 + 2416 + 48120 + 10164 + 850
        ((28, 28, 1), 44_426),  # 156 + 2416 + 257*120 + 10164 + 850
    ],
)
def test_lenet_exact_param_count(input_shape, expected):
    variables = _abstract_init(LeNet(), input_shape)
    assert _leaf_count(variables) == expected
    conv0 = variables["params"]["Conv_0"]["kernel"].shape
    assert conv0 == (5, 5, input_shape[2], 6)


@pytest.mark.parametrize(
    "name, input_shape, expected",
    [
        ("mlp", (28, 28, 1), 159_010),
        ("mlp", (28, 28, 3), 472_610),
        ("mlp2", (28, 28, 1), 199_210),
        ("lenet", (32, 32, 1), 61_706),
        ("lenet", (32, 32, 3), 62_006),
        ("lenet", (28, 28, 1), 44_426),
        ("mlp_small", (28, 28, 1), 7_960),  # 795*10 + 10
        ("lenet_small", (28, 28, 1), 3_034),  # 52 + 204 + 65*32 + 33*16 + 17*10
    ],
)
def test_build_model_param_count(name, input_shape, expected):
    model = build_model(name, input_shape, 10)
    assert model.num_params == expected
    assert _leaf_count(jax.eval_shape(model.init, jax.random.key(1))) == expected


# Materialising params compiles one truncated-normal sampler per kernel shape (1-3 s each on a
# loaded CPU), so only the two MLPs (three kernel shapes between them) are initialised for real;
# the other models' init is traced with eval_shape, which runs the same Python code.
MATERIALISED = ("mlp", "mlp2")


@pytest.mark.slow
@pytest.mark.parametrize("name", MATERIALISED)
def test_materialised_params_count(name):
    model, params = _built(name)
    assert count_params(params) == _leaf_count(params) == model.num_params
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    assert set(params) == {"params"}


def test_count_params_accepts_shape_structs():
    tree = {"a": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": [jnp.zeros(5), jnp.zeros(())]}
    assert count_params(tree) == 18


# ------------------------------------------------------------------------ forward pass


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_jit_matches_eager(name):
    model = build_model(name, MNIST, 10)
    params = _random_params(model, seed=1)
    x = jax.random.normal(jax.random.key(1), (3, *MNIST))
    with jax.default_matmul_precision("highest"):
        eager = model.apply(params, x)
        jitted = jax.jit(model.apply)(params, x)
    assert eager.shape == jitted.shape == (3, 10)
    assert eager.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(eager)))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    # Other class counts and batch sizes, traced only.
    other = build_model(name, MNIST, 7)
    out = jax.eval_shape(
        other.apply, jax.eval_shape(other.init, jax.random.key(0)), jnp.zeros((5, *MNIST))
    )
    assert out.shape == (5, 7)


def _np_conv_valid(x, kernel, bias, stride):
    n, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.empty((n, oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, kernel)
    return out + bias


def _np_max_pool(x, p):
    n, h, w, c = x.shape
    x = x[:, : h // p * p, : w // p * p, :]
    return x.reshape(n, h // p, p, w // p, p, c).max(axis=(2, 4))


def _np_lenet(variables, x, *, n_conv, n_dense, stride, pool):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    x = np.asarray(x, np.float64)
    for i in range(n_conv):
        conv = p[f"Conv_{i}"]
        x = np.maximum(_np_conv_valid(x, conv["kernel"], conv["bias"], stride), 0)
        if pool > 1:
            x = _np_max_pool(x, pool)
    x = x.reshape(x.shape[0], -1)
    for i in range(n_dense):
        x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        if i < n_dense - 1:
            x = np.maximum(x, 0)
    return x


@pytest.mark.parametrize("stride, pool", [(1, 2), (2, 1), (1, 3)])
def test_lenet_matches_float64_numpy(stride, pool):
    overrides = {
        "features": [3, 4],
        "kernel_size": 3,
        "stride": stride,
        "hidden": [6],
        "pool": pool,
    }
    model = build_model("lenet_small", (20, 17, 2), 5, **overrides)
    params = _random_params(model, seed=stride * 10 + pool)
    x = jax.random.normal(jax.random.key(3), (2, 20, 17, 2))
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)(params, x)
    want = _np_lenet(params, x, n_conv=2, n_dense=2, stride=stride, pool=pool)
    assert got.shape == (2, 5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_mlp_matches_float64_numpy():
    model = build_model("mlp2", (4, 3, 2), 5)
    params = _random_params(model, seed=0)
    x = jax.random.normal(jax.random.key(1), (3, 4, 3, 2))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    h = np.asarray(x, np.float64).reshape(3, -1)
    h = np.maximum(h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    h = np.maximum(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
    want = h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)(params, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ config round trip


@pytest.mark.parametrize("name", MATERIALISED)
def test_from_config_rebuilds_identical_params(name):
    model, params = _built(name)
    config = json.loads(json.dumps(model.config))  # must survive JSON
    assert config == model.config
    rebuilt = from_config(config)
    assert rebuilt.module == model.module
    again = rebuilt.init(jax.random.key(0))
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    # A different key gives different parameters (so the check above can fail).
    other = rebuilt.init(jax.random.key(1))
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(params), strict=True
        )
    )


@pytest.mark.parametrize(
    "name, input_shape, overrides",
    [
        ("mlp2", (8, 8, 3), {}),
        ("lenet", (32, 32, 3), {}),
        ("mlp", MNIST, {"hidden": (7, 5)}),
        ("mlp_small", MNIST, {"width": 3, "depth": 2}),
        ("lenet_small", MNIST, {"features": (3, 5, 4), "kernel_size": 3, "hidden": (9,)}),
    ],
)
def test_config_with_overrides_round_trips(name, input_shape, overrides):
    model = build_model(name, input_shape, 4, **overrides)
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    assert set(config) == {"name", "input_shape", "num_classes", *MODELS[name].defaults}
    for rebuilt in (from_config(config), build_model(**config)):
        assert rebuilt.config == model.config
        assert rebuilt.module == model.module
        assert rebuilt.num_params == model.num_params
        shapes = jax.eval_shape(rebuilt.init, jax.random.key(0))
        assert shapes == jax.eval_shape(model.init, jax.random.key(0))


def test_config_records_resolved_defaults():
    cfg = build_model("lenet", (32, 32, 1), 10).config
    assert cfg == {
        "name": "lenet",
        "input_shape": [32, 32, 1],
        "num_classes": 10,
        "features": [6, 16],
        "kernel_size": 5,
        "stride": 1,
        "hidden": [120, 84],
        "pool": 2,
    }
    assert build_model("mlp_small", MNIST, 10).config["width"] == 10


# ------------------------------------------------------------------------ validation


def test_model_names_match_registry():
    assert model_names() == (
        "lenet",
        "lenet_small",
        "mlp",
        "mlp2",
        "mlp_small",
        "resnet20",
        "resnet32",
        "vit",
    )


def test_unknown_model_lists_allowed():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*lenet_small.*mlp_small"):
        build_model("resnet", MNIST, 10)


def test_unknown_override_lists_allowed():
    with pytest.raises(ValueError, match="no setting 'width'.*allowed: hidden"):
        build_model("mlp", MNIST, 10, width=5)
    with pytest.raises(ValueError, match="allowed: features, hidden, kernel_size, pool, stride"):
        build_model("lenet_small", MNIST, 10, channels=[1, 2])


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("mlp", {"hidden": [0]}, "hidden must be a list of integers >= 1"),
        ("mlp", {"hidden": "200"}, "hidden must be a list"),
        ("mlp", {"hidden": [2.5]}, "hidden must be a list"),
        ("mlp_small", {"width": 0}, "width must be an integer >= 1, got 0"),
        ("mlp_small", {"width": True}, "width must be an integer >= 1, got True"),
        ("mlp_small", {"depth": 1.0}, "depth must be an integer >= 1"),
        ("lenet_small", {"features": []}, r"features must be .*length >= 1"),
        ("lenet_small", {"kernel_size": 0}, "kernel_size must be an integer >= 1"),
        ("lenet_small", {"stride": -1}, "stride must be an integer >= 1"),
        ("lenet_small", {"pool": None}, "pool must be an integer >= 1"),
    ],
)
def test_bad_override_values(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, MNIST, 10, **overrides)


@pytest.mark.parametrize(
    "input_shape, num_classes, match",
    [
        ((28, 28), 10, "input_shape must be"),
        ((28, 0, 1), 10, "input_shape must be"),
        ("abc", 10, "input_shape must be"),
        (MNIST, 0, "num_classes must be an integer >= 1, got 0"),
        (MNIST, 2.0, "num_classes must be"),
    ],
)
def test_bad_shapes(input_shape, num_classes, match):
    with pytest.raises(ValueError, match=match):
        build_model("mlp", input_shape, num_classes)


@pytest.mark.parametrize(
    "input_shape, overrides, match",
    [
        # 12 -> conv5 -> 8 -> pool -> 4 < 5: the second conv collapses.
        ((12, 12, 1), {}, r"Conv_1 \(kernel_size=5\).*input is 4x4 \(model input 12x12\)"),
        # kernel larger than the image: the first conv collapses.
        (MNIST, {"kernel_size": 29}, r"Conv_0 \(kernel_size=29\).*input is 28x28"),
        # 9 -> conv5 -> 5 -> pool 6: the pool collapses.
        ((9, 30, 1), {"pool": 6}, r"max-pool after Conv_0 \(pool=6\).*input is 5x26"),
        # three convs at stride 2, no pooling, on 28: 12 -> 4 < 5: Conv_2 collapses.
        (MNIST, {"features": [2, 2, 2], "stride": 2, "pool": 1}, r"Conv_2 .*input is 4x4"),
    ],
)
def test_spatial_collapse_raises(input_shape, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model("lenet_small", input_shape, 10, **overrides)


def test_module_raises_on_collapse_too():
    with pytest.raises(ValueError, match="Conv_1"):
        LeNet().init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))


def test_lenet_spatial_sizes():
    assert lenet_spatial_sizes((32, 32), (6, 16), 5, 1, 2) == [(14, 14), (5, 5)]
    assert lenet_spatial_sizes((28, 28), (6, 16), 5, 1, 2) == [(12, 12), (4, 4)]
    assert lenet_spatial_sizes((28, 20), (1, 1), 3, 2, 1) == [(13, 9), (6, 4)]


def test_apply_rejects_wrong_input_shape():
    model = build_model("lenet", MNIST, 10)
    params = _random_params(model, seed=0)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 28, 28, 1\)"):
        model.apply(params, jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="expects input"):
        model.apply(params, jnp.zeros((28, 28, 1)))


def test_from_config_requires_keys():
    with pytest.raises(ValueError, match="lacks input_shape, num_classes"):
        from_config({"name": "mlp"})


# ------------------------------------------------------------------------ small model grid

# Documented grids on MNIST (28x28x1, 10 classes) for the default targets
# 1k, 2k, 4k, 8k, 15k, 30k, 60k.
# mlp_small, one hidden layer of width h: 795 * h + 10 parameters.
MNIST_MLP_GRID = [
    (1, 805),
    (3, 2_395),
    (5, 3_985),
    (10, 7_960),
    (19, 15_115),
    (38, 30_220),
    (75, 59_635),
]
# lenet_small, kernel 5, stride 1, pool 2 (4x4 spatial after the second pool):
# (features, hidden) -> parameters.
MNIST_LENET_GRID = [
    ((1, 2), (17, 12), 985),
    ((1, 3), (25, 18), 1_987),
    ((2, 5), (35, 24), 4_256),
    ((2, 7), (49, 34), 7_996),
    ((3, 9), (70, 49), 14_891),
    ((5, 13), (98, 69), 29_781),
    ((7, 19), (139, 97), 60_481),
]


def _hand_lenet_count(features, hidden, input_hw, channels, num_classes):
    """Independent count for kernel 5, stride 1, pool 2."""
    (c1, c2), (h1, h2) = features, hidden
    s = ((input_hw - 4) // 2 - 4) // 2
    return (
        (25 * channels + 1) * c1
        + (25 * c1 + 1) * c2
        + (s * s * c2 + 1) * h1
        + (h1 + 1) * h2
        + (h2 + 1) * num_classes
    )


def test_mnist_mlp_grid_documented():
    grid = small_model_grid("mlp", MNIST, 10)
    assert [(o["width"], n) for o, n in grid] == MNIST_MLP_GRID
    assert all(n == 795 * h + 10 for h, n in MNIST_MLP_GRID)
    assert all(o["depth"] == 1 for o, _ in grid)


def test_mnist_lenet_grid_documented():
    grid = small_model_grid("lenet", MNIST, 10)
    got = [(tuple(o["features"]), tuple(o["hidden"]), n) for o, n in grid]
    assert got == MNIST_LENET_GRID
    for features, hidden, n in MNIST_LENET_GRID:
        assert _hand_lenet_count(features, hidden, 28, 1, 10) == n


@pytest.mark.parametrize("kind", sorted(GRID_MODELS))
@pytest.mark.parametrize("input_shape", [MNIST, (32, 32, 1), (32, 32, 3)])
def test_grid_monotone_covers_range_and_builds(kind, input_shape):
    grid = small_model_grid(kind, input_shape, 10)
    counts = [n for _, n in grid]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert 45_000 <= counts[-1] <= 75_000
    if kind == "lenet" or math.prod(input_shape) < 1_500:
        assert counts[0] <= 1_500 and len(counts) == len(DEFAULT_GRID_TARGETS)
    else:  # a width-1 MLP on 3,072 inputs already has 3,093 parameters
        assert counts[0] == math.prod(input_shape) + 21
    for overrides, n in grid:
        assert build_model(GRID_MODELS[kind], input_shape, 10, **overrides).num_params == n


def test_grid_custom_targets_and_validation():
    grid = small_model_grid("mlp", MNIST, 10, targets=[7_960, 805, 900])
    assert [n for _, n in grid] == [805, 7_960]  # deduplicated, sorted
    with pytest.raises(ValueError, match="unknown grid kind 'cnn'; allowed: lenet, mlp"):
        small_model_grid("cnn", MNIST, 10)
    with pytest.raises(ValueError, match="targets must be"):
        small_model_grid("mlp", MNIST, 10, targets=[])
    with pytest.raises(ValueError, match="targets must be"):
        small_model_grid("lenet", MNIST, 10, targets=[0])
