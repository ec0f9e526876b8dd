"""ResNets with BatchNorm and the ViT in the registry, and training them in a subspace.

Parameter counts are checked against formulas written here (independent of the registry's),
BatchNorm's running statistics against numpy, and training against the subspace contract: the
statistics change while the parameters move only inside span(P).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checks import TINY_RESNET

import subspace_jax as sj
from subspace_jax.data import load_dataset
from subspace_jax.data._classes import select_classes
from subspace_jax.models import build_model, classifier_path, state_collections
from subspace_jax.train import TrainConfig, split_state, train_and_evaluate

CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)
#: Three steps of the tiny ResNet in a Fastfood subspace on digits.
TINY_RESNET_RUN = TrainConfig(
    model="resnet20",
    dataset="digits",
    dim=40,
    projection="fastfood",
    epochs=1,
    batch_size=16,
    max_steps=3,
    model_overrides=TINY_RESNET,
)
TINY_VIT = {"patch": 7, "embed_dim": 8, "depth": 1, "heads": 2, "mlp_dim": 8}


def _shared_data() -> Path | None:
    here = Path(__file__).resolve()
    for root in (here.parents[2], here.parents[3]):  # main checkout, or a worktree beside it
        if (root / "shared" / "data").is_dir():
            return root / "shared" / "data"
    return None


def _resnet_formula(c: int, n: int, widths, classes: int) -> int:
    """He et al.'s CIFAR ResNet with option-A shortcuts, counted layer by layer."""
    layers = [(3 * 3 * c * widths[0], widths[0])]  # (conv weights, BN channels)
    prev = widths[0]
    for w in widths:
        for _ in range(n):
            layers += [(9 * prev * w, w), (9 * w * w, w)]
            prev = w
    convs = sum(k for k, _ in layers)
    bn = sum(2 * ch for _, ch in layers)  # scale and bias
    return convs + bn + prev * classes + classes


def _vit_formula(hw, c, patch, e, depth, mlp, classes) -> int:
    n_tokens = (hw // patch) ** 2 + 1
    attention = 3 * (e * e + e) + (e * e + e)  # q, k, v and the output projection
    mlp_params = e * mlp + mlp + mlp * e + e
    layer_norms = 2 * 2 * e
    embed = patch * patch * c * e + e
    return (
        embed
        + e
        + n_tokens * e
        + depth * (attention + mlp_params + layer_norms)
        + 2 * e
        + (e * classes + classes)
    )


@pytest.mark.parametrize(
    "name, shape, classes, expected",
    [
        ("resnet20", CIFAR, 10, 269_722),  # He et al. 2016, Table 6: 0.27M
        ("resnet32", CIFAR, 10, 464_154),  # 0.46M
        ("resnet20", CIFAR, 5, 269_722 - 64 * 5 - 5),
        ("resnet20", MNIST, 10, 269_722 - 9 * 16 * 2),
        ("vit", CIFAR, 10, None),
        ("vit", CIFAR, 5, None),
    ],
)
def test_param_counts_match_independent_formula(name, shape, classes, expected):
    model = build_model(name, shape, classes)
    if name.startswith("resnet"):
        n = {"resnet20": 3, "resnet32": 5}[name]
        formula = _resnet_formula(shape[2], n, (16, 32, 64), classes)
    else:
        formula = _vit_formula(shape[0], shape[2], 4, 128, 6, 256, classes)
    assert model.num_params == formula
    if expected is not None:
        assert formula == expected
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert counted == formula


def test_resnet_state_is_not_counted_and_is_declared():
    model = build_model("resnet20", CIFAR, 10)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert set(shapes) == {"params", "batch_stats"}
    # One mean and one variance per BN channel: 19 BNs (stem + 18 in blocks).
    bn_channels = 16 + 2 * 3 * (16 + 32 + 64)
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes["batch_stats"])) == 2 * bn_channels
    assert model.state_collections == state_collections("resnet20") == ("batch_stats",)
    assert state_collections("vit") == state_collections("lenet") == ()
    assert model.head == classifier_path("resnet20") == "params/head"
    assert classifier_path("lenet") == "params/Dense_2"
    assert classifier_path("mlp_small", {"depth": 2}) == "params/Dense_2"


def test_vit_rejects_bad_patch_and_heads():
    with pytest.raises(ValueError, match="patch 5 must divide"):
        build_model("vit", CIFAR, 10, patch=5)
    with pytest.raises(ValueError, match="heads"):
        build_model("vit", CIFAR, 10, heads=3)


@pytest.mark.slow
def test_batchnorm_running_stats_update_like_numpy():
    """Training mode normalises with the batch and moves the running mean and variance by
    momentum 0.9; evaluation mode uses the running statistics (float64 numpy reference)."""
    model = build_model("resnet20", MNIST, 10, **TINY_RESNET)
    variables = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, *MNIST))
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
    kernel = np.asarray(variables["params"]["Conv_0"]["kernel"], np.float64)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((6, 28, 28, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nhwc,co->nhwo", xp[:, i : i + 28, j : j + 28], kernel[i, j])
    mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    stats = updates["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
    # Evaluation with the new statistics differs from evaluation with the initial ones.
    new = {**variables, "batch_stats": updates["batch_stats"]}
    assert not np.allclose(model.apply(new, x), model.apply(variables, x))


# ------------------------------------------------------------------- training in a subspace


def _digits(n_train=64):
    data = load_dataset("digits", val_size=32)
    return data._replace(
        x_train=data.x_train[:n_train],
        y_train=data.y_train[:n_train],
        x_test=data.x_test[:32],
        y_test=data.y_test[:32],
        fingerprint=None,
    )


def _check_state_moved_and_span(config, data, *, check_span=True):
    """Train, then: the statistics moved, and theta - theta0 = sum_j w_j P e_j exactly."""
    result, trained = train_and_evaluate(config, data)
    assert not result["diverged"]
    sub = jax.tree_util.tree_map(lambda a: a[0], trained.subs)
    trainable = jax.tree_util.tree_map(lambda a: a[0], trained.trainables)
    inner, state = split_state(trainable)
    before = jax.tree_util.tree_leaves(sub.other_collections["batch_stats"])
    after = jax.tree_util.tree_leaves(state["batch_stats"])
    assert len(before) == len(after) > 0
    assert any(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
    assert all(np.all(np.isfinite(a)) for a in after)
    # The statistics are not projected: D counts params only; w moved.
    assert sub.layout.num_params == trained.model.num_params
    if layout_dim := sub.layout.dim:
        assert layout_dim == inner.w.shape[0] and float(jnp.abs(inner.w).max()) > 0
    else:  # direct training: every parameter leaf is trained as itself
        moved = [
            not np.allclose(a, b)
            for a, b in zip(inner.direct, jax.tree_util.tree_leaves(sub.theta0), strict=True)
        ]
        assert len(moved) == len(sub.layout.spec.leaves) and any(moved)
    if not check_span:
        return result, sub, inner, state
    layout = sub.layout
    theta = sj.to_params(sub, inner)
    # Column decomposition of P w, group by group (independent of to_params' bookkeeping).
    w = np.asarray(inner.w)
    delta = []
    for g, st in zip(layout.groups, sub.proj_states, strict=True):
        proj = sj.get_projection(g.projection)
        cols = jax.jit(jax.vmap(lambda e, st=st, proj=proj: proj.apply(st, e)))
        eye = np.eye(g.dim, dtype=np.float32)
        acc = np.zeros(g.size)
        for start in range(0, g.dim, 128):
            block = np.asarray(cols(eye[start : start + 128]), np.float64)
            acc += w[g.offset + start : g.offset + start + len(block)] @ block
        delta.append(acc)
    delta = np.concatenate(delta)
    flat_theta = np.concatenate(
        [np.ravel(x) for x in jax.tree_util.tree_leaves(theta["params"])]
    ).astype(np.float64)
    flat_theta0 = np.concatenate(
        [np.ravel(x) for x in jax.tree_util.tree_leaves(sub.theta0["params"])]
    ).astype(np.float64)
    projected = [i for g in layout.groups for i in g.leaves]
    assert projected == sorted(projected) == list(range(len(layout.spec.leaves)))
    np.testing.assert_allclose(flat_theta - flat_theta0, delta, rtol=1e-4, atol=1e-5)
    # theta0 is the model's own initialisation for the seed's model key.
    k_model, _ = jax.random.split(jax.random.key(config.seeds[0]))
    init = trained.model.init(k_model)
    for a, b in zip(
        jax.tree_util.tree_leaves(init["params"]),
        jax.tree_util.tree_leaves(sub.theta0["params"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    return result, sub, inner, state


@pytest.mark.slow
def test_resnet_trains_in_fastfood_subspace_with_batchnorm():
    config = TINY_RESNET_RUN
    result, sub, inner, state = _check_state_moved_and_span(config, _digits())
    assert result["num_params"] == build_model("resnet20", MNIST, 10, **TINY_RESNET).num_params
    # Evaluation uses the running statistics: the reported accuracy is that of apply(train=False)
    # with the trained state.
    data = _digits()
    model = build_model("resnet20", MNIST, 10, **TINY_RESNET)
    logits = model.apply(sj.to_params(sub, inner, state), jnp.asarray(data.x_test))
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == data.y_test))
    assert result["test_accuracy"] == pytest.approx(acc, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["per_layer", "said", "direct", "dense"])
def test_resnet_subspace_kinds(kind):
    config = TrainConfig(
        model="resnet20",
        dataset="digits",
        dim=0 if kind == "direct" else 60,
        projection="dense" if kind == "dense" else "fastfood",
        per_layer=kind == "per_layer",
        said=kind == "said",
        epochs=1,
        batch_size=16,
        max_steps=2,
        model_overrides=TINY_RESNET,
    )
    _check_state_moved_and_span(config, _digits(), check_span=kind in ("per_layer", "dense"))


@pytest.mark.slow
@pytest.mark.parametrize("projection", sorted(sj.projections.projection_names()))
def test_resnet_every_projection(projection):
    """Every registered projection trains the BatchNorm ResNet (tiny width, 2 steps)."""
    config = TrainConfig(
        model="resnet20",
        dataset="digits",
        dim=30,
        projection=projection,
        epochs=1,
        batch_size=16,
        max_steps=2,
        model_overrides=TINY_RESNET,
    )
    _check_state_moved_and_span(config, _digits(), check_span=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["global", "per_layer", "said"])
def test_vit_trains_in_subspace(kind):
    config = TrainConfig(
        model="vit",
        dataset="digits",
        dim=50,
        projection="fastfood",
        per_layer=kind == "per_layer",
        said=kind == "said",
        epochs=1,
        batch_size=16,
        max_steps=2,
        model_overrides=TINY_VIT,
    )
    result, _ = train_and_evaluate(config, _digits())
    assert not result["diverged"] and result["dim"] == 50


# --------------------------------------------------------------- classes and fine-tuning


def test_select_classes_relabels_in_order():
    data = load_dataset("digits", val_size=100)
    sub = select_classes(data, [7, 2, 5])
    assert sub.num_classes == 3
    for xs, ys, x0, y0 in (
        (sub.x_train, sub.y_train, data.x_train, data.y_train),
        (sub.x_val, sub.y_val, data.x_val, data.y_val),
        (sub.x_test, sub.y_test, data.x_test, data.y_test),
    ):
        keep = np.isin(y0, [7, 2, 5])
        np.testing.assert_array_equal(xs, x0[keep])
        expected = np.array([{7: 0, 2: 1, 5: 2}[int(v)] for v in y0[keep]])
        np.testing.assert_array_equal(ys, expected)
        assert ys.dtype == y0.dtype
    for bad, match in (([3], "at least 2"), ([1, 1], "distinct"), ([0, 10], "not labels")):
        with pytest.raises(ValueError, match=match):
            select_classes(data, bad)


@pytest.mark.slow
def test_classes_config_builds_a_k_class_model():
    config = TrainConfig(
        model="mlp_small", dataset="digits", epochs=1, max_steps=2, classes=(5, 6, 7, 8, 9)
    )
    result, trained = train_and_evaluate(config)
    assert trained.model.config["num_classes"] == 5
    assert result["config"]["classes"] == [5, 6, 7, 8, 9]
    # The default config's dict (and so the sweep's reuse key) is unchanged by the new fields.
    assert not {"classes", "augment", "reinit_head"} & set(TrainConfig().to_dict())
    with pytest.raises(ValueError, match="classes"):
        train_and_evaluate(dataclasses.replace(config, classes=(1,)))


@pytest.mark.slow
def test_reinit_head_trains_the_head_directly_from_a_checkpoint(tmp_path):
    """--save-params then --theta0 --reinit-head: the body starts at the checkpoint, the head
    is each seed's fresh draw trained directly, and d counts only the subspace."""
    from subspace_jax._checkpoint import load_params, save_params
    from subspace_jax.train import first_seed_variables

    data = _digits()
    pre = TrainConfig(
        model="resnet20",
        dataset="digits",
        epochs=1,
        batch_size=16,
        max_steps=2,
        model_overrides=TINY_RESNET,
        classes=(0, 1, 2, 3, 4),
    )
    pre_data = select_classes(data, pre.classes)
    _, trained = train_and_evaluate(pre, pre_data)
    ckpt = save_params(tmp_path / "pre.npz", first_seed_variables(trained))
    five_way = build_model("resnet20", MNIST, 5, **TINY_RESNET)
    stored = load_params(ckpt, jax.eval_shape(five_way.init, jax.random.key(0)))
    assert set(stored) == {"params", "batch_stats"}

    fine = dataclasses.replace(
        pre,
        classes=(5, 6, 7, 8, 9),
        dim=30,
        projection="fastfood",
        theta0_path=str(ckpt),
        reinit_head=True,
        seeds=(0, 1),
    )
    result, tuned = train_and_evaluate(fine, select_classes(data, fine.classes))
    assert result["dim"] == 30  # the head is not counted
    layout = jax.tree_util.tree_map(lambda a: a[0], tuned.subs).layout
    head_leaves = [leaf.path for leaf in layout.spec.leaves if leaf.path.startswith("params/head")]
    assert [layout.spec.leaves[i].path for i in layout.direct_leaves] == head_leaves
    assert sum(g.size for g in layout.groups) + 4 * 5 + 5 == layout.num_params
    theta0 = tuned.subs.theta0["params"]
    # Body: the checkpoint for both seeds. Head: a fresh draw per seed.
    for seed in range(2):
        np.testing.assert_array_equal(
            theta0["Conv_0"]["kernel"][seed], stored["params"]["Conv_0"]["kernel"]
        )
    np.testing.assert_array_equal(
        tuned.subs.other_collections["batch_stats"]["BatchNorm_0"]["mean"][0],
        stored["batch_stats"]["BatchNorm_0"]["mean"],
    )
    h0, h1 = theta0["head"]["kernel"]
    assert not np.allclose(h0, h1)
    assert not np.allclose(h0, stored["params"]["head"]["kernel"])
    # The head moved (trained directly) and is not theta0 + P w.
    inner, _ = split_state(jax.tree_util.tree_map(lambda a: a[0], tuned.trainables))
    assert not np.allclose(inner.direct[1], h0)


# ------------------------------------------------------------------------ real CIFAR-10


@pytest.mark.realdata
@pytest.mark.slow
def test_done_when_resnet20_cifar10_fastfood_2000():
    """The issue's done-when run at a few steps: ResNet-20, CIFAR-10, Fastfood d = 2000."""
    root = _shared_data()
    if root is None or not (root / "cifar10").is_dir():
        pytest.skip("real CIFAR-10 not found under ../shared/data")
    data = load_dataset("cifar10", str(root / "cifar10"), val_size=5000)
    data = data._replace(
        x_train=data.x_train[:256],
        y_train=data.y_train[:256],
        x_val=data.x_val[:64],
        y_val=data.y_val[:64],
        x_test=data.x_test[:64],
        y_test=data.y_test[:64],
        fingerprint=None,
    )
    config = TrainConfig(
        model="resnet20",
        dataset="cifar10",
        dim=2000,
        projection="fastfood",
        epochs=1,
        batch_size=32,
        max_steps=3,
    )
    # The column-by-column check is for the tiny models above (2,000 columns of D = 269,722
    # take minutes here); the CLI test below fits span(P) by least squares instead.
    result, sub, inner, _ = _check_state_moved_and_span(config, data, check_span=False)
    assert result["num_params"] == 269_722 and result["dim"] == 2000
    (group,) = sub.layout.groups
    delta = sj.get_projection(group.projection).apply(sub.proj_states[0], inner.w)
    theta, theta0 = sj.to_params(sub, inner)["params"], sub.theta0["params"]
    moved = np.concatenate(
        [
            np.ravel(a) - np.ravel(b)
            for a, b in zip(
                jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(theta0), strict=True
            )
        ]
    )
    np.testing.assert_allclose(moved, np.asarray(delta), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- the CLI

TINY_CLI = ["--quiet", "--epochs", "1", "--max-steps", "3", "--batch-size", "32"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--classes", "3"], "at least 2"),
        (["train", "--classes", "1,1"], "at least 2 distinct"),
        (["train", "--classes", "a,b"], "class"),
        (["train", "--classes", "0,12"], "not labels"),
        (["id", "--theta0", "nowhere.npz"], "--theta0"),
        (["sweep", "--dims", "4", "--theta0", "nowhere.npz"], "--theta0"),
    ],
)
def test_bad_task_flags_are_short_errors(args, message, capsys, tmp_path, monkeypatch):
    from subspace_jax import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


@pytest.mark.slow
def test_a_compressed_batchnorm_model_keeps_its_trained_statistics(tmp_path):
    """--save-compressed of a model with state stores the trained BatchNorm statistics (which
    differ from the initial ones the key would rebuild) beside w: the file rebuilds the
    trained variables bit for bit and scores the run's test numbers."""
    from subspace_jax.compress import evaluate_compressed, load_compressed, save_compressed

    config = TINY_RESNET_RUN
    data = _digits()
    result, trained = train_and_evaluate(config, data)
    path = tmp_path / "bn.npz"
    header = save_compressed(path, result, trained)
    assert [o["path"].split("/")[0] for o in header["others"]] == ["batch_stats"] * len(
        header["others"]
    )
    sub = jax.tree_util.tree_map(lambda a: a[0], trained.subs)
    inner, state = split_state(jax.tree_util.tree_map(lambda a: a[0], trained.trainables))
    want = jax.jit(sj.to_params)(sub, inner, state)  # as the file is written and read
    params, info = load_compressed(path)
    assert info["params_match"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
    leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want), strict=True)
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    initial = jax.tree_util.tree_leaves(sub.other_collections["batch_stats"])
    trained_stats = jax.tree_util.tree_leaves(state["batch_stats"])
    assert any(not np.array_equal(a, b) for a, b in zip(initial, trained_stats, strict=True))
    scored = evaluate_compressed(path, data=data)
    assert scored["test_accuracy"] == pytest.approx(result["per_seed"][0]["test_accuracy"])
    assert scored["test_loss"] == pytest.approx(result["per_seed"][0]["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_save_params_then_theta0_with_reinit_head(tmp_path):
    """train --save-params writes the first seed's variables; --theta0 --reinit-head starts
    there with a new 3-class head trained directly (d counts only the subspace)."""
    from subspace_jax import cli
    from subspace_jax._checkpoint import load_params

    ckpt = tmp_path / "pre.npz"
    args = ["train", "--model", "mlp_small", *TINY_CLI, "--classes", "0,1,2,3,4"]
    assert cli.main([*args, "--seeds", "3,4", "--save-params", str(ckpt)]) == 0
    five = build_model("mlp_small", MNIST, 5)
    saved = load_params(ckpt, jax.eval_shape(five.init, jax.random.key(0)))
    # The first seed (3): its direct training moved its own init.
    k_model, _ = jax.random.split(jax.random.key(3))
    init = five.init(k_model)["params"]["Dense_0"]["kernel"]
    assert init.shape == saved["params"]["Dense_0"]["kernel"].shape
    assert not np.allclose(init, saved["params"]["Dense_0"]["kernel"])
    assert np.abs(np.asarray(init) - saved["params"]["Dense_0"]["kernel"]).max() < 0.1

    out = tmp_path / "fine.json"
    fine = ["train", "--model", "mlp_small", *TINY_CLI, "--classes", "5,6,7"]
    fine += ["--dim", "20", "--projection", "fastfood", "--theta0", str(ckpt), "--reinit-head"]
    assert cli.main([*fine, "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["dim"] == 20 and result["theta0"] == f"checkpoint:{ckpt}"
    assert result["config"]["reinit_head"] is True and result["config"]["classes"] == [5, 6, 7]
    # Without --reinit-head the 5-class checkpoint does not fit a 3-class model: exit 2.
    no_head = [a for a in fine if a != "--reinit-head"]
    assert cli.main(no_head) == 2


@pytest.mark.slow
def test_augment_changes_training_deterministically():
    base = TrainConfig(model="mlp_small", dataset="digits", epochs=1, max_steps=4, batch_size=32)
    plain = train_and_evaluate(base).result
    aug = [train_and_evaluate(dataclasses.replace(base, augment=True)).result for _ in range(2)]
    assert aug[0]["history"][0]["train_loss"] == aug[1]["history"][0]["train_loss"]
    assert aug[0]["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    assert aug[0]["config"]["augment"] is True


def _cgls(apply, transpose, b: np.ndarray, iters: int = 200, tol: float = 1e-10):
    """Least squares ``min_w ||P w - b||`` by conjugate gradients on the normal equations
    (CGLS), with ``P`` given by its products only; float64. Returns ``(w, residual)``."""
    w = np.zeros(len(transpose(b)))
    r = b.copy()
    s = transpose(r)
    p, gamma = s.copy(), s @ s
    for _ in range(iters):
        q = apply(p)
        alpha = gamma / (q @ q)
        w += alpha * p
        r -= alpha * q
        s = transpose(r)
        new = s @ s
        if new < tol * tol:
            break
        p, gamma = s + new / gamma * p, new
    return w, r


@pytest.mark.realdata
@pytest.mark.slow
def test_done_when_cli_resnet20_cifar10_fastfood_2000(tmp_path):
    """The issue's command through the real entry point (2 steps): the saved BatchNorm
    statistics moved from their initial values, and theta - theta0 is in span(P): a least-squares
    fit on P's columns leaves no residual (while a perturbed difference does)."""
    import json
    import subprocess
    import sys

    from subspace_jax import init_from_layout
    from subspace_jax._checkpoint import load_params
    from subspace_jax.train import config_layout

    root = _shared_data()
    if root is None or not (root / "cifar10").is_dir():
        pytest.skip("real CIFAR-10 not found under ../shared/data")
    ckpt, out = tmp_path / "theta.npz", tmp_path / "result.json"
    cmd = [sys.executable, "-m", "subspace_jax", "train", "--model", "resnet20"]
    cmd += ["--dataset", "cifar10", "--data-dir", str(root / "cifar10"), "--dim", "2000"]
    cmd += ["--projection", "fastfood", "--epochs", "1", "--max-steps", "2", "--quiet"]
    cmd += ["--val-size", "500", "--batch-size", "32"]
    cmd += ["--save-params", str(ckpt), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num_params"] == 269_722 and result["dim"] == 2000
    model = build_model("resnet20", CIFAR, 10)
    saved = load_params(ckpt, jax.eval_shape(model.init, jax.random.key(0)))
    k_model, k_proj = jax.random.split(jax.random.key(0))
    theta0 = model.init(k_model)
    stats = zip(
        jax.tree_util.tree_leaves(saved["batch_stats"]),
        jax.tree_util.tree_leaves(theta0["batch_stats"]),
        strict=True,
    )
    assert all(not np.allclose(a, b) for a, b in stats)  # every statistic moved
    config = TrainConfig(model="resnet20", dataset="cifar10", dim=2000, projection="fastfood")
    sub = init_from_layout(k_proj, theta0, config_layout(config, theta0))
    (group,) = sub.layout.groups
    proj, state = sj.get_projection(group.projection), sub.proj_states[0]
    apply = jax.jit(lambda w: proj.apply(state, w))
    transpose = jax.jit(lambda g: proj.transpose(state, g))

    def flat(params):
        return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)])

    delta = (flat(saved["params"]) - flat(theta0["params"])).astype(np.float64)
    assert np.linalg.norm(delta) > 0

    def fit(b):
        return _cgls(
            lambda w: np.asarray(apply(jnp.asarray(w, jnp.float32)), np.float64),
            lambda g: np.asarray(transpose(jnp.asarray(g, jnp.float32)), np.float64),
            b,
        )

    _, residual = fit(delta)
    assert np.linalg.norm(residual) < 1e-3 * np.linalg.norm(delta)
    # Control: the same difference plus a random direction (almost surely outside span(P)).
    noise = np.random.default_rng(0).normal(size=delta.shape) * np.linalg.norm(delta) / 500
    _, residual = fit(delta + noise)
    assert np.linalg.norm(residual) > 0.5 * np.linalg.norm(noise)
