"""The epoch loop: chunks of steps as one ``lax.scan``, the data on the device or fed from
the host, against a plain per-step reference loop (the loop as it was before the scan)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checks import TINY_RESNET
from jax.experimental import sparse

from subspace_jax._subspace import init_trainable
from subspace_jax.data import iterate_batches, num_batches, shuffle_order
from subspace_jax.models import build_model
from subspace_jax.train import (
    TrainConfig,
    _epochs,
    _loop,
    _step,
    compile_steps,
    config_layout,
    init_divergence,
    init_runs,
    load_data,
    loops_on_host,
    make_optimizer,
    over_seeds,
    resolve_lr,
    run_keys,
    train_and_evaluate,
)
from subspace_jax.train._augment import augment, batch_key
from subspace_jax.train._loop import _build_model

# 3500 training examples / 64 = 54 steps an epoch; 70 steps end inside the second epoch.
BASE = TrainConfig(model="mlp_small", epochs=3, max_steps=70, batch_size=64, seeds=(0, 1))
TIMING = {"wall_time_s", "step_time_ms", "peak_memory_bytes", "setup_time_s", "epoch_time_s"}


@pytest.fixture(scope="module")
def data():
    return load_data(BASE)


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def reference_run(config: TrainConfig, data):
    """One host-fed jitted step at a time, one evaluation call per split: ``(trainables,
    [(epoch's per-step losses (S, N), val accuracy (N,))])``."""
    model, _ = _build_model(config, data, None)
    layout = config_layout(config, jax.eval_shape(model.init, jax.random.key(0)))
    opt = make_optimizer(config.optimizer, resolve_lr(config, layout))
    train_step, eval_step = compile_steps(model.apply, opt, config.l2, guard=True)
    subs = init_runs(config, model, layout, run_keys(config.seeds))
    t = jax.tree_util.tree_map(jnp.copy, jax.vmap(init_trainable)(subs))
    o = jax.vmap(opt.init)(t)
    n = len(config.seeds)
    div = jax.tree_util.tree_map(lambda x: jnp.zeros((n,), x.dtype), init_divergence())
    total = min(config.max_steps, config.epochs * num_batches(len(data.x_train), 64))
    step, curves = 0, []
    for epoch in range(config.epochs):
        losses = []
        for xb, yb in iterate_batches(
            data.x_train, data.y_train, config.batch_size, seed=config.data_seed, epoch=epoch
        ):
            if step == total:
                break
            if config.augment:  # the per-step loop's augmentation: the step's own key
                xb = augment(batch_key(config.data_seed, step), jnp.asarray(xb))
            t, o, div, loss, _ = train_step(subs, t, o, div, xb, yb)
            losses.append(np.asarray(loss))
            step += 1
        _, correct = eval_step(subs, t, data.x_val, data.y_val)
        curves.append((np.stack(losses), np.asarray(correct) / len(data.y_val)))
        if step == total:
            break
    return jax.device_get(t), curves


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [dict(dim=0), dict(dim=60, projection="fastfood"), dict(dim=0, augment=True)],
    ids=["direct", "fastfood", "augment"],
)
def test_scan_loop_gives_the_per_step_loop_numbers(data, kind):
    config = dataclasses.replace(BASE, **kind)
    result, trained = train_and_evaluate(config, data)
    ref_t, curves = reference_run(config, data)
    # The same steps on the same batches: the variables agree to float tolerance (on this CPU
    # they are bit-identical; XLA may fuse a step inside a scan differently elsewhere).
    for got, want in zip(
        jax.tree_util.tree_leaves(jax.device_get(trained.trainables)),
        jax.tree_util.tree_leaves(ref_t),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert [h["steps"] for h in result["history"]] == [54, 70]
    assert result["steps"] == 70
    for h, (losses, val_acc) in zip(result["history"], curves, strict=True):
        np.testing.assert_allclose(h["per_seed_train_loss"], losses.mean(0), rtol=1e-6)
        np.testing.assert_allclose(h["per_seed_val_accuracy"], val_acc, rtol=1e-6)
    assert np.isfinite(result["step_time_ms"]) and result["step_time_ms"] > 0


@pytest.mark.slow
def test_host_fed_batches_and_any_chunk_length_give_the_same_run(data, monkeypatch):
    config = dataclasses.replace(BASE, dim=40, projection="dense", seeds=(3,))
    events = []
    on_device = train_and_evaluate(config, data, progress=events.append).result
    steps = [e["step"] for e in events if e["event"] == "step"]
    # Chunks of 32 steps: 32 + 22 in epoch 1, 16 (of a padded 32) in epoch 2.
    assert steps == [32, 54, 70]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]

    monkeypatch.setattr(_epochs, "DEVICE_DATA_FRACTION", 0.0)  # nothing fits: host batches
    monkeypatch.setattr(_epochs, "MIN_CHUNK_STEPS", 5)  # ceil(54 / 10) = 6 steps a chunk
    events = []
    host = train_and_evaluate(config, data, progress=events.append).result
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == [*range(6, 55, 6), 60, 66, 70]
    assert _untimed(host) == _untimed(on_device)


def test_place_data_respects_the_size_limit(data):
    size = sum(a.nbytes for a in data[:6])
    placed = _epochs.place_data(data, limit=size)
    assert placed.on_device and isinstance(placed.train[0], jax.Array)
    np.testing.assert_array_equal(np.asarray(placed.val[1]), data.y_val)
    host = _epochs.place_data(data, limit=size - 1)
    assert not host.on_device and host.train == () and host.test[0] is data.x_test


def test_chunk_steps():
    assert _epochs.chunk_steps(429, 4290) == 43  # MNIST, batch 128: 10 chunks an epoch
    assert _epochs.chunk_steps(54, 1000) == 32  # at least MIN_CHUNK_STEPS ...
    assert _epochs.chunk_steps(10, 1000) == 10  # ... but no more than an epoch
    assert _epochs.chunk_steps(54, 3) == 3  # or the run


def test_shuffle_order_is_the_order_of_iterate_batches():
    x, y = np.arange(50)[:, None] * 10, np.arange(50)
    for epoch in (0, 3):
        order = shuffle_order(50, seed=7, epoch=epoch)
        got = [yb for _, yb in iterate_batches(x, y, 8, seed=7, epoch=epoch)]
        np.testing.assert_array_equal(np.concatenate(got), y[order[:48]])
        assert sorted(order) == list(range(50))
    assert not np.array_equal(
        shuffle_order(50, seed=7, epoch=0), shuffle_order(50, seed=7, epoch=1)
    )


def _trained_with(config, data, monkeypatch, host: bool):
    """``train_and_evaluate`` with the chunk stepped from the host or scanned."""
    calls = []

    def decide(setup):
        calls.append(host)
        return host

    monkeypatch.setattr(_loop, "_loops_on_host", decide)
    out = train_and_evaluate(config, data)
    assert calls, "the loop did not ask where to step"
    return out


@pytest.mark.parametrize(
    "kind",
    [
        dict(model="lenet_small", dim=60, projection="fastfood", augment=True),
        # Three steps: this 2-channel BatchNorm net amplifies rounding differences ~10x a step,
        # so that even two float32 orders of the same sums part by 1e-3 after five steps.
        dict(
            model="resnet20", model_overrides=TINY_RESNET, dim=40, projection="dense", max_steps=3
        ),
        dict(model="lenet_small", dim=0, host_batches=True),
    ],
    ids=["lenet-fastfood-augment", "batchnorm-state", "direct-host-fed"],
)
def test_host_stepped_chunks_give_the_scanned_chunks_numbers(data, monkeypatch, kind):
    kind = dict(kind)
    if kind.pop("host_batches", False):
        monkeypatch.setattr(_epochs, "DEVICE_DATA_FRACTION", 0.0)  # batches fed from the host
    # 40 steps: one chunk of 32 in epoch 1, then a padded one (8 valid) in the same epoch.
    kind.setdefault("max_steps", 40)
    config = dataclasses.replace(BASE, epochs=1, seeds=(0, 1, 2), **kind)
    scanned_result, scanned = _trained_with(config, data, monkeypatch, host=False)
    host_result, host = _trained_with(config, data, monkeypatch, host=True)
    # The same steps on the same batches. The seeds are unrolled instead of vmapped and the
    # step is fused at the top level instead of in a loop body, so XLA rounds differently,
    # and 40 steps amplify that to ~5e-5; one step more or less moves weights by ~1e-3.
    for got, want in zip(
        jax.tree_util.tree_leaves(jax.device_get(host.trainables)),
        jax.tree_util.tree_leaves(jax.device_get(scanned.trainables)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)
    assert host_result["steps"] == scanned_result["steps"] == config.max_steps
    for key in ("per_seed_train_loss", "per_seed_val_loss"):
        np.testing.assert_allclose(
            host_result["history"][0][key], scanned_result["history"][0][key], rtol=1e-4
        )
    for got, want in zip(host_result["per_seed"], scanned_result["per_seed"], strict=True):
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
    assert np.isfinite(host_result["step_time_ms"]) and host_result["step_time_ms"] > 0


def test_host_chunk_stops_diverging_seeds_like_the_scan(data, monkeypatch):
    # SGD at a learning rate that overflows (at step 3 on this CPU): both loops record the
    # same first bad step and stop there.
    config = dataclasses.replace(
        BASE,
        model="lenet_small",
        epochs=1,
        max_steps=20,
        seeds=(0, 1),
        dim=0,
        optimizer="sgd",
        lr=1e4,
        on_divergence="stop",
    )
    results = [_trained_with(config, data, monkeypatch, host)[0] for host in (False, True)]
    assert results[0]["diverged_seeds"] == results[1]["diverged_seeds"] != []
    assert [s["diverged_step"] for s in results[0]["per_seed"]] == [
        s["diverged_step"] for s in results[1]["per_seed"]
    ]


def test_loops_on_host_only_for_convolutions_on_the_cpu(monkeypatch):
    x = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
    for name, conv in (("lenet_small", True), ("mlp_small", False), ("resnet20", True)):
        model = build_model(name, (28, 28, 1), 10)
        variables = jax.eval_shape(model.init, jax.random.key(0))
        assert loops_on_host(model.apply, variables, x) is conv, name
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert loops_on_host(model.apply, variables, x) is False


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_over_seeds_unrolled_is_vmap(jit):
    def fn(a, tree, shared):
        t = tree[0] @ tree[1] + shared[:2] + tree[2] @ shared[:2]
        return {"s": jnp.sum(a * shared), "t": t}, a.mean()

    rng = np.random.default_rng(0)
    sparse_p = rng.normal(size=(3, 2, 2)) * (rng.random((3, 2, 2)) < 0.5)
    args = (
        jnp.asarray(rng.normal(size=(3, 5))),
        (
            jnp.asarray(rng.normal(size=(3, 2, 4))),
            jnp.asarray(rng.normal(size=(3, 4, 2))),
            sparse.BCOO.fromdense(jnp.asarray(sparse_p), n_batch=1),  # as a sparse projection
        ),
        jnp.asarray(rng.normal(size=(5,))),
    )
    in_axes = (0, 0, None)
    want = jax.vmap(fn, in_axes=in_axes)(*args)
    unrolled = over_seeds(fn, in_axes, unroll=True)
    got = (jax.jit(unrolled) if jit else unrolled)(*args)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_over_seeds_unrolls_convolutions_into_plain_ones_up_to_the_cap():
    def conv(kernel, x):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME")

    def groups(n):
        # Both operands per seed, as every layer after the first: vmap groups the convolution.
        kernels, x = jnp.ones((n, 4, 3, 3, 3)), jnp.ones((n, 2, 3, 8, 8))
        jaxpr = jax.make_jaxpr(over_seeds(conv, (0, 0), unroll=True))(kernels, x)
        eqns = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        return [e.params["feature_group_count"] for e in eqns]

    cap = _step.MAX_UNROLLED_SEEDS
    assert groups(3) == [1, 1, 1]  # three plain convolutions, no grouped one
    assert groups(cap) == [1] * cap
    assert groups(cap + 1) == [cap + 1]  # beyond the cap: vmap's one grouped convolution
