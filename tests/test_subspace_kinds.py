"""Subspaces beyond the random one: SAID, burn-in, lottery, and fine-tuning from a checkpoint."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_jax as sj
from subspace_jax import projections as pj
from subspace_jax.compress import load_compressed, load_params, save_compressed, save_params
from subspace_jax.train import (
    DIRECT_LR,
    TrainConfig,
    direct_phase,
    load_data,
    make_optimizer,
    top_directions,
    train_and_evaluate,
)


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1)))))


THETA0 = TinyMLP().init(jax.random.key(0), jnp.ones((1, 5)))
NUM_LEAVES = 4

# A tiny model on the embedded digits: every run below compiles in seconds.
BASE = TrainConfig(
    model="mlp_small",
    model_overrides={"width": 8},
    dataset="digits",
    epochs=1,
    batch_size=64,
    val_size=200,
    seeds=(0,),
)


def bits_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True)
    )


def first(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


@pytest.fixture(scope="module")
def data():
    return load_data(BASE)


# ------------------------------------------------------------ SAID and fine-tuning from theta0


def test_said_dimension_bookkeeping_follows_the_paper():
    lay = sj.make_layout(THETA0, 20, said=True)
    # d counts the m scales: w gets d - m coordinates.
    assert (lay.num_scales, lay.dim, lay.total_dim) == (NUM_LEAVES, 20 - NUM_LEAVES, 20)
    assert lay.said_leaves == (0, 1, 2, 3)
    t = sj.init_trainable(sj.Subspace(theta0=THETA0, proj_states=(), layout=lay))
    assert t.w.shape == (16,)
    np.testing.assert_array_equal(np.asarray(t.scales), np.ones(NUM_LEAVES, np.float32))
    per_leaf = sj.make_layout(THETA0, 12, said=True, per_leaf=True)
    assert per_leaf.dim == 8 and per_leaf.total_dim == 12
    assert sum(g.dim for g in per_leaf.groups) == 8
    # Only projected leaves get a scale.
    frozen = sj.make_layout(THETA0, 10, said=True, labels={"params/Dense_1/bias": "frozen"})
    assert frozen.num_scales == 3 and frozen.dim == 7
    # A plain subspace has the same fields, with no scales.
    plain = sj.make_layout(THETA0, 20)
    assert plain.total_dim == plain.dim == 20
    t = sj.init_trainable(sj.Subspace(theta0=THETA0, proj_states=(), layout=plain))
    assert t.scales.shape == (0,) and t.w.shape == (20,)
    with pytest.raises(ValueError, match=r"SAID needs d > number of projected leaves \(m = 4\)"):
        sj.init_subspace(jax.random.key(1), THETA0, 4, said=True)
    with pytest.raises(ValueError, match="per-leaf SAID needs d >= 2 m = 8"):
        sj.init_subspace(jax.random.key(1), THETA0, 7, said=True, per_leaf=True)
    with pytest.raises(ValueError, match="said=True needs projected leaves"):
        sj.init_subspace(jax.random.key(1), THETA0, 0, said=True)


def test_said_zero_w_gives_theta0_for_any_scales():
    sub = sj.init_subspace(jax.random.key(2), THETA0, 10, said=True)
    t = sj.init_trainable(sub)._replace(scales=jnp.asarray([0.5, -3.0, 7.0, 0.0], jnp.float32))
    assert bits_equal(jax.jit(sj.to_params)(sub, t), THETA0)


@pytest.mark.slow
def test_said_to_params_and_scale_gradients_against_float64():
    sub = sj.init_subspace(jax.random.key(3), THETA0, 12, said=True, projection="dense")
    rng = np.random.default_rng(0)
    w = rng.standard_normal(sub.layout.dim).astype(np.float32)
    lam = rng.uniform(0.5, 2.0, NUM_LEAVES).astype(np.float32)
    t = sj.Trainable(w=jnp.asarray(w), direct=(), scales=jnp.asarray(lam))
    P = np.asarray(pj.as_matrix(pj.get_projection("dense"), sub.proj_states[0], 8), np.float64)
    delta = P @ w.astype(np.float64)
    flat0, spec = sj.flatten(THETA0)
    want = np.asarray(flat0, np.float64).copy()
    for k, leaf in enumerate(spec.leaves):
        sl = slice(leaf.offset, leaf.offset + leaf.size)
        want[sl] += lam[k] * delta[sl]
    got, _ = sj.flatten(sj.to_params(sub, t))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)

    # L = 0.5 ||theta||^2: dL/dlambda_k = <(P w)_k, theta_k>, dL/dw = P^T (Lambda theta).
    def loss(tr):
        flat, _ = sj.flatten(sj.to_params(sub, tr))
        return 0.5 * jnp.sum(flat**2)

    grads = jax.jit(jax.grad(loss))(t)
    g_lam = [
        want[leaf.offset : leaf.offset + leaf.size] @ delta[leaf.offset : leaf.offset + leaf.size]
        for leaf in spec.leaves
    ]
    np.testing.assert_allclose(np.asarray(grads.scales), g_lam, rtol=1e-4)
    scaled = np.concatenate(
        [lam[k] * want[leaf.offset : leaf.offset + leaf.size] for k, leaf in enumerate(spec.leaves)]
    )
    np.testing.assert_allclose(np.asarray(grads.w), P.T @ scaled, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"scales \(SAID\) must have shape \(4,\)"):
        sj.to_params(sub, t._replace(scales=jnp.ones(3)))


@pytest.fixture(scope="module")
def direct_run(data):
    """A direct run of K steps: the burn-in reference and the fine-tuning checkpoint."""
    config = dataclasses.replace(BASE, dim=0, max_steps=6)
    _, trained = train_and_evaluate(config, data)
    return first(jax.vmap(sj.to_params)(trained.subs, trained.trainables))


@pytest.fixture(scope="module")
def said_finetune(tmp_path_factory, data, direct_run):
    """One SAID run fine-tuned from the direct run's checkpoint (serves two tests)."""
    path = save_params(tmp_path_factory.mktemp("ckpt") / "theta.msgpack", direct_run)
    config = dataclasses.replace(BASE, dim=30, said=True, max_steps=20, theta0_path=str(path))
    result, trained = train_and_evaluate(config, data)
    return path, config, result, trained


@pytest.mark.slow
def test_said_scales_are_trained(said_finetune):
    _, _, result, trained = said_finetune
    assert (result["dim"], result["said_scales"], result["w_dim"]) == (30, 4, 26)
    t = first(trained.trainables)
    assert t.w.shape == (26,)
    lam = np.asarray(t.scales)
    assert lam.shape == (4,) and np.all(np.isfinite(lam))
    assert np.max(np.abs(lam - 1.0)) > 1e-3  # the scales received gradients and moved
    assert np.isfinite(result["test_accuracy"])


@pytest.mark.slow
def test_fine_tuning_starts_at_the_checkpoint(tmp_path, data, direct_run, said_finetune):
    path, config, result, trained = said_finetune
    assert result["theta0"] == f"checkpoint:{path}"
    sub = first(trained.subs)
    assert bits_equal(sub.theta0, direct_run)
    assert bits_equal(jax.jit(sj.to_params)(sub, sj.init_trainable(sub)), direct_run)
    # A checkpoint of another model is refused with the leaves named.
    bad = save_params(tmp_path / "bad.npz", {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}})
    with pytest.raises(ValueError, match="missing leaves .*Dense_1"):
        train_and_evaluate(dataclasses.replace(config, theta0_path=str(bad)), data)


# ------------------------------------------------------------------------- burn-in, checkpoints


@pytest.mark.slow
def test_burn_in_starts_the_subspace_at_the_burned_in_point(tmp_path, data, direct_run):
    config = dataclasses.replace(BASE, dim=20, burn_in_steps=6, max_steps=3)
    result, trained = train_and_evaluate(config, data)
    assert result["burn_in_steps"] == 6 and result["theta0"] == "init+burn_in:6"
    sub = first(trained.subs)
    # w = 0 gives the burned-in point exactly.
    assert bits_equal(jax.jit(sj.to_params)(sub, sj.init_trainable(sub)), sub.theta0)
    # The burned-in point moved away from the initialisation ...
    k_model, _ = jax.random.split(jax.random.key(0))
    init = trained.model.init(k_model)
    moved = [
        np.max(np.abs(np.asarray(a) - np.asarray(b)))
        for a, b in zip(
            jax.tree_util.tree_leaves(sub.theta0), jax.tree_util.tree_leaves(init), strict=True
        )
    ]
    assert min(moved) > 1e-4
    # ... and is what direct training for the same K steps reaches (same batches, same Adam).
    for a, b in zip(
        jax.tree_util.tree_leaves(sub.theta0), jax.tree_util.tree_leaves(direct_run), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The projection is still the random one of the run's projection key.
    _, k_proj = jax.random.split(jax.random.key(0))
    ref = sj.init_from_layout(k_proj, sub.theta0, sub.layout)
    np.testing.assert_allclose(
        np.asarray(ref.proj_states[0].matrix), np.asarray(sub.proj_states[0].matrix), rtol=1e-6
    )
    # Compressed: the burned-in theta0 must be stored; P is still regenerated from the key.
    with pytest.raises(ValueError, match="theta0 is not the model's initialisation"):
        save_compressed(tmp_path / "burn.npz", result, trained)
    header = save_compressed(tmp_path / "burn.npz", result, trained, allow_stored=True)
    assert not header["theta0_reproducible"] and header["projection_reproducible"]
    params, info = load_compressed(tmp_path / "burn.npz")
    assert info["params_match"]
    assert bits_equal(params, jax.jit(sj.to_params)(sub, first(trained.trainables)))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".msgpack", ".npz"])
def test_checkpoint_round_trip_and_mismatch_errors(tmp_path, direct_run, suffix):
    path = save_params(tmp_path / f"theta{suffix}", direct_run)
    shapes = jax.eval_shape(lambda: direct_run)
    assert bits_equal(load_params(path, shapes), direct_run)
    other = TinyMLP().init(jax.random.key(0), jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="does not match the model's parameter tree"):
        load_params(path, other)


# ------------------------------------------------------------------------------------ lottery


def principal_cosines(a, b):
    """Cosines of the principal angles between the column spans of a and b (orthonormalised)."""
    qa, _ = np.linalg.qr(np.asarray(a, np.float64))
    qb, _ = np.linalg.qr(np.asarray(b, np.float64))
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def test_top_directions_recovers_a_planted_subspace():
    rng = np.random.default_rng(0)
    D, T = 300, 9
    basis, _ = np.linalg.qr(rng.standard_normal((D, 2)))
    coeffs = rng.standard_normal((T, 2)) * np.array([5.0, 2.0])
    traj = 3.0 + coeffs @ basis.T + 1e-4 * rng.standard_normal((T, D))  # offset is centred away
    u = top_directions(traj.astype(np.float32), 2)
    np.testing.assert_allclose(u.T @ u, np.eye(2), atol=1e-12)
    assert np.all(principal_cosines(u, basis) > 1 - 1e-6)
    with pytest.raises(ValueError, match=r"rank <= T - 1 = 8"):
        top_directions(traj, 9)


@pytest.mark.slow
def test_lottery_projection_is_the_trajectory_top_directions(tmp_path, data):
    d, steps, every = 5, 12, 1
    config = dataclasses.replace(
        BASE, dim=d, projection="lottery", max_steps=steps, lottery_every=every
    )
    result, trained = train_and_evaluate(config, data)
    assert result["projection"] == "lottery" and result["dim"] == d
    sub = first(trained.subs)
    P = np.asarray(sub.proj_states[0].matrix, np.float64)
    np.testing.assert_array_equal(np.asarray(sub.proj_states[0].scale), np.ones(d, np.float32))
    np.testing.assert_allclose(P.T @ P, np.eye(d), atol=1e-5)  # orthonormal columns
    # The subspace starts at the model's initialisation (Larsen et al. 2022).
    k_model, _ = jax.random.split(jax.random.key(0))
    init = jax.jit(trained.model.init)(k_model)
    for a, b in zip(
        jax.tree_util.tree_leaves(sub.theta0), jax.tree_util.tree_leaves(init), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # Reference: the same direct trajectory, its float64 SVD by numpy (rows = points).
    _, traj = direct_phase(
        trained.model.apply,
        make_optimizer(config.optimizer, DIRECT_LR),
        jax.tree_util.tree_map(lambda x: x[None], sub.theta0),
        data,
        num_steps=steps,
        batch_size=config.batch_size,
        data_seed=config.data_seed,
        record_every=every,
    )
    assert traj.shape == (1, steps + 1, result["num_params"])
    x = traj[0].astype(np.float64)
    _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    assert s[d - 1] > 1.01 * s[d]  # the top-d subspace is well defined
    cos = principal_cosines(P, vt[:d].T)
    assert np.all(cos > 1 - 1e-4), cos
    # Compressed: P is not a key-only projection, so it must be stored.
    with pytest.raises(ValueError, match="a lottery subspace: P comes from a training trajectory"):
        save_compressed(tmp_path / "lottery.npz", result, trained)
    header = save_compressed(tmp_path / "lottery.npz", result, trained, allow_stored=True)
    assert not header["projection_reproducible"] and header["theta0_reproducible"]
    assert header["stored"] == ["proj_0_0", "proj_0_1", "w"]
    params, info = load_compressed(tmp_path / "lottery.npz")
    assert info["params_match"]


def test_lottery_needs_enough_trajectory_points(data):
    config = dataclasses.replace(BASE, dim=10, projection="lottery", max_steps=6, lottery_every=1)
    with pytest.raises(ValueError, match=r"T = 7 points.*rank <= 6 < d = 10"):
        train_and_evaluate(config, data)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(dim=0, said=True), "said needs a subspace"),
        (dict(dim=0, burn_in_steps=3), "burn_in_steps needs a subspace"),
        (dict(dim=5, burn_in_steps=-1), "burn_in_steps must be an integer >= 0"),
        (dict(dim=5, projection="lottery", burn_in_steps=2), "cannot be combined"),
        (dict(dim=5, projection="lottery", lottery_every=0), "lottery_every must be"),
    ],
)
def test_bad_kind_settings_are_rejected_before_training(changes, match):
    from subspace_jax.train import validate_config

    with pytest.raises(ValueError, match=match):
        validate_config(dataclasses.replace(BASE, **changes))
