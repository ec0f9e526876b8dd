"""Divergence: a non-finite loss or state stops that seed (and only it), flagged and reported."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_jax as sj
from subspace_jax import cli
from subspace_jax.compress import save_compressed
from subspace_jax.models import build_model
from subspace_jax.train import (
    TrainConfig,
    compile_steps,
    guard_finite,
    init_divergence,
    load_data,
    train_and_evaluate,
)

SMALL = TrainConfig(model="mlp_small", epochs=1, max_steps=8, batch_size=64)


@pytest.fixture(scope="module")
def data():
    return load_data(SMALL)


def _counter_step(sub, t, opt_state, x, y):
    """A fake step: ``t`` counts steps; the loss (at the state passed in) is NaN once ``t`` reaches
    ``sub[0]``, the new ``t`` is inf once it would reach ``sub[1]``; the optimiser state counts
    steps too (a float and an int leaf)."""
    del x, y
    loss = jnp.where(t >= sub[0], jnp.nan, t)
    new_t = jnp.where(t + 1 >= sub[1], jnp.inf, t + 1)
    new_opt = (opt_state[0] + 1.0, opt_state[1] + 1)
    return new_t, new_opt, loss, jnp.zeros(())


def test_guard_records_the_first_non_finite_step_and_freezes_only_that_seed():
    # Per seed: (loss NaN from t = a, new t inf at b).
    limits = jnp.array([[3.0, 99], [99, 5], [99, 1], [99, 99]])
    n = len(limits)
    guarded = jax.jit(jax.vmap(guard_finite(_counter_step), in_axes=(0, 0, 0, 0, None, None)))
    t = jnp.zeros(n)
    opt = (jnp.zeros(n), jnp.zeros(n, jnp.int32))
    div = jax.vmap(lambda _: init_divergence())(jnp.arange(n))
    for _ in range(10):
        t, opt, div, _, _ = guarded(limits, t, opt, div, None, None)
    # Seed 0: steps 1-3 take t to 3; step 4 computes a NaN loss at t = 3: diverged at 4.
    # Seed 1: step 5 would make t = 5 inf: diverged at 5 with t = 4 (after step 4).
    # Seed 2: the first step would make t inf: diverged at 1, t still 0.
    # Seed 3 never diverges and takes all 10 steps.
    np.testing.assert_array_equal(np.asarray(div.at), [4, 5, 1, 0])
    np.testing.assert_array_equal(np.asarray(div.steps), [10] * n)
    np.testing.assert_array_equal(np.asarray(t), [3, 4, 0, 10])
    # The optimiser state stays with the trainable (integer leaves included).
    np.testing.assert_array_equal(np.asarray(opt[0]), [3, 4, 0, 10])
    np.testing.assert_array_equal(np.asarray(opt[1]), [3, 4, 0, 10])


@pytest.mark.slow
def test_guarded_step_is_bit_identical_to_the_plain_step_while_finite(data):
    model = build_model("mlp_small", (28, 28, 1), 10)
    opt = optax.adam(0.01)
    plain, _ = compile_steps(model.apply, opt)
    guarded, _ = compile_steps(model.apply, opt, guard=True)

    def start():
        keys = jax.random.split(jax.random.key(0), 2)
        subs = jax.vmap(lambda k: sj.init_subspace(k, model.init(k), 30))(keys)
        ts = jax.vmap(sj.init_trainable)(subs)
        return subs, ts, jax.vmap(opt.init)(ts)

    subs, ta, oa = start()
    _, tb, ob = start()
    div = jax.vmap(lambda _: init_divergence())(jnp.arange(2))
    x, y = data.x_train[:64], data.y_train[:64]
    for _ in range(4):
        ta, oa, la, _ = plain(subs, ta, oa, x, y)
        tb, ob, div, lb, _ = guarded(subs, tb, ob, div, x, y)
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    np.testing.assert_array_equal(np.asarray(ta.w), np.asarray(tb.w))
    assert np.asarray(div.at).tolist() == [0, 0]


def _blow_up_theta0(seed: int, scale: float = 1e20):
    """A ``theta0_fn`` giving seed ``seed`` a theta0 ``scale`` times too large (its first loss
    is not finite) and every other seed the model's own initialisation."""
    model = build_model("mlp_small", (28, 28, 1), 10)
    k_model = jax.random.split(jax.random.key(seed))[0]  # the loop's key rule
    bad = jax.random.key_data(k_model)

    def theta0_fn(key):
        is_bad = jnp.all(jax.random.key_data(key) == bad)
        return jax.tree_util.tree_map(lambda p: p * jnp.where(is_bad, scale, 1.0), model.init(key))

    return theta0_fn


@pytest.fixture(scope="module")
def one_diverged(data):
    """``dim -> (config, result, trained)``: seeds 0, 1 where seed 1 diverges at step 1."""
    cache = {}

    def run(dim):
        if dim not in cache:
            config = dataclasses.replace(SMALL, dim=dim, seeds=(0, 1))
            cache[dim] = (
                config,
                *train_and_evaluate(config, data, theta0_fn=_blow_up_theta0(1)),
            )
        return cache[dim]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("dim", [0, 40])
def test_one_diverged_seed_is_flagged_frozen_and_left_out_of_the_means(
    data, one_diverged, dim, tmp_path
):
    config, result, trained = one_diverged(dim)
    clean = train_and_evaluate(config, data, theta0_fn=_blow_up_theta0(1, scale=1.0)).result
    s0, s1 = result["per_seed"]
    assert (s0["diverged"], s0["diverged_step"]) == (False, None)
    assert (s1["diverged"], s1["diverged_step"]) == (True, 1)  # 1-based: the first step
    assert result["diverged"] is True and result["diverged_seeds"] == [1]
    assert s0["retries"] == s1["retries"] == 0
    assert s0["learning_rate"] == s1["learning_rate"] == result["learning_rate"]
    # Seed 0 is unaffected: bit for bit what it gives beside a seed that did not diverge.
    assert s0 == clean["per_seed"][0]
    assert [h["per_seed_val_accuracy"][0] for h in result["history"]] == [
        h["per_seed_val_accuracy"][0] for h in clean["history"]
    ]
    # Seed 1 never moved: its trainable is still its start (w = 0, or the blown-up theta0).
    if dim == 0:
        theta0 = jax.tree_util.tree_leaves(trained.subs.theta0)
        for a, b in zip(trained.trainables.direct, theta0, strict=True):
            np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    else:
        np.testing.assert_array_equal(np.asarray(trained.trainables.w[1]), 0.0)
    # The means are over the seeds that did not diverge, i.e. seed 0 alone.
    assert result["val_accuracy"] == s0["val_accuracy"]
    assert result["test_accuracy"] == s0["test_accuracy"]
    last = result["history"][-1]
    assert last["val_accuracy"] == last["per_seed_val_accuracy"][0]
    assert result["history"][-1]["per_seed_diverged"] == [False, True]
    # The clean run's means are over both seeds.
    assert clean["diverged"] is False and clean["diverged_seeds"] == []
    assert clean["val_accuracy"] == pytest.approx(
        np.mean([s["val_accuracy"] for s in clean["per_seed"]])
    )
    if dim:
        # A diverged seed is never saved as a compressed model.
        with pytest.raises(ValueError, match="diverged"):
            save_compressed(tmp_path / "m.npz", result, trained, 1)
        assert not (tmp_path / "m.npz").exists()


@pytest.mark.slow
def test_retry_trains_a_diverged_seed_again_at_a_tenth_of_the_rate(data):
    # Plain SGD at 1e4 diverges at step 8 of 8; at 1e3 it stays finite.
    base = dataclasses.replace(SMALL, dim=100, optimizer="sgd", lr=1e4, on_divergence="retry")
    retried = train_and_evaluate(base, data).result
    (s,) = retried["per_seed"]
    assert not s["diverged"] and s["retries"] == 1 and s["learning_rate"] == pytest.approx(1e3)
    assert retried["diverged"] is False and retried["diverged_seeds"] == []
    assert retried["learning_rate"] == 1e4  # the configured rate; per_seed has the one used
    # The retried seed is a run from scratch at 1e3, bit for bit.
    fresh = train_and_evaluate(dataclasses.replace(base, lr=1e3, on_divergence="stop"), data).result
    same = ("retries", "learning_rate")
    assert {k: v for k, v in s.items() if k not in same} == {
        k: v for k, v in fresh["per_seed"][0].items() if k not in same
    }
    no_time = [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in fresh["history"]]
    assert [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in retried["history"]] == (
        no_time
    )


@pytest.mark.slow
def test_retries_are_bounded_and_replace_only_the_diverged_seed(data, one_diverged):
    config, stopped, _ = one_diverged(40)
    config = dataclasses.replace(config, on_divergence="retry", max_retries=1)
    retried, trained = train_and_evaluate(config, data, theta0_fn=_blow_up_theta0(1))
    assert retried["per_seed"][0] == stopped["per_seed"][0]
    s1 = retried["per_seed"][1]  # a blown-up theta0 diverges at any learning rate
    assert s1["diverged"] and s1["diverged_step"] == 1 and s1["retries"] == 1
    assert s1["learning_rate"] == pytest.approx(retried["learning_rate"] / 10)
    assert retried["diverged_seeds"] == [1]
    assert retried["val_accuracy"] == stopped["val_accuracy"]
    assert trained.trainables.w.shape[0] == 2


def test_config_validation_and_defaults_keep_the_config_dict():
    assert "on_divergence" not in TrainConfig().to_dict()
    assert "max_retries" not in TrainConfig().to_dict()
    assert TrainConfig(on_divergence="retry").to_dict()["on_divergence"] == "retry"
    from subspace_jax.train import validate_config

    with pytest.raises(ValueError, match="on_divergence"):
        validate_config(TrainConfig(on_divergence="ignore"))
    with pytest.raises(ValueError, match="max_retries"):
        validate_config(TrainConfig(max_retries=-1))
    flags = ["train", "--on-divergence", "retry", "--max-retries", "3"]
    config = cli.config_from_args(cli.build_parser().parse_args(flags))
    assert (config.on_divergence, config.max_retries) == ("retry", 3)
    default = cli.config_from_args(cli.build_parser().parse_args(["train"]))
    assert (default.on_divergence, default.max_retries) == ("stop", 2)


@pytest.mark.parametrize(
    "args",
    [["--on-divergence", "ignore"], ["--max-retries", "-1"], ["--max-retries", "x"]],
)
def test_bad_divergence_flags_are_a_short_error(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("dim", ["0", "100"])
def test_train_cli_flags_divergence_and_exits_3(tmp_path, capsys, dim):
    # The case: plain SGD at 1e6 on the default digits data, one epoch.
    out = tmp_path / "r.json"
    args = ["train", "--quiet", "--model", "mlp_small", "--optimizer", "sgd", "--lr", "1e6"]
    args += ["--epochs", "1", "--dim", dim, "--json", str(out)]
    model = tmp_path / "m.npz"
    if dim != "0":
        args += ["--save-compressed", str(model)]
    assert cli.main(args) == cli.EXIT_DIVERGED == 3
    err = capsys.readouterr().err
    res = json.loads(out.read_text())
    (s,) = res["per_seed"]
    assert res["diverged"] is True and res["diverged_seeds"] == [0]
    assert s["diverged"] is True and isinstance(s["diverged_step"], int) and s["diverged_step"] >= 1
    assert res["val_accuracy"] is None and res["test_accuracy"] is None
    assert f"seed 0 diverged at step {s['diverged_step']}" in err and "lower --lr" in err
    assert "error: every seed diverged" in err and "Traceback" not in err
    if dim != "0":
        assert not model.exists() and "not saving" in err
