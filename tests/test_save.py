"""save_subspace / load_subspace: any model (BatchNorm included) saved and rebuilt bit for bit."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import subspace_jax as sj
from subspace_jax import CompressedModelError
from subspace_jax._archive import read_archive, write_archive

# The user's own model, defined identically in this process and in the fresh one.
MODEL_SRC = textwrap.dedent(
    """
    import flax.linen as nn
    import jax.numpy as jnp

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(16)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
            x = nn.relu(x)
            return nn.Dense(3)(x)

    model = Net()
    X = jnp.linspace(-1.0, 1.0, 24 * 5, dtype=jnp.float32).reshape(24, 5) ** 3
    Y = (jnp.arange(24) % 3).astype(jnp.int32)

    def init_fn(key):
        return model.init(key, X[:1])
    """
)
ns: dict = {}
exec(MODEL_SRC, ns)
model, X, Y, init_fn = ns["model"], ns["X"], ns["Y"], ns["init_fn"]


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def train(sub, steps=5):
    """A few Adam steps of the BatchNorm model; returns the trainable and the batch_stats."""
    opt = optax.adam(sj.default_learning_rate(sub))

    def loss_fn(t, sub, stats):
        variables = sj.to_params(sub, t, {"batch_stats": stats})
        logits, new = model.apply(variables, X, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()
        return loss, new["batch_stats"]

    @jax.jit
    def step(sub, t, s, stats):
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(t, sub, stats)
        with jax.numpy_dtype_promotion("standard"):
            u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, stats, loss

    t = sj.init_trainable(sub)
    s = opt.init(t)
    stats = sub.other_collections["batch_stats"]
    losses = []
    for _ in range(steps):
        t, s, stats, loss = step(sub, t, s, stats)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    return t, stats


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    k_model, k_proj = jax.random.split(jax.random.key(7))
    variables = init_fn(k_model)
    sub = sj.init_subspace(k_proj, variables, 20, projection="fastfood")
    t, stats = train(sub)
    path = tmp_path_factory.mktemp("saved") / "net.npz"
    header = sj.save_subspace(
        path,
        sub,
        t,
        key=k_proj,
        init_fn=init_fn,
        init_key=k_model,
        collections={"batch_stats": stats},
        metadata={"note": "BatchNorm test"},
    )
    variables = sj.to_params(sub, t, {"batch_stats": stats})
    preds = jax.jit(lambda v: model.apply(v, X))(variables)
    return path, header, sub, t, stats, preds


@pytest.mark.slow
def test_batchnorm_model_reloads_in_a_fresh_process_to_identical_predictions(saved, tmp_path):
    path, header, sub, t, stats, preds = saved
    # Only keys, layout, w and the trained batch_stats are stored: theta0 and P are rebuilt.
    assert header["theta0_reproducible"] and header["projection_reproducible"]
    assert header["stored"] == ["other_0", "other_1", "w"]
    assert header["metadata"] == {"note": "BatchNorm test"}
    script = MODEL_SRC + textwrap.dedent(
        f"""
        import jax, numpy as np
        import subspace_jax as sj
        sub, t, info = sj.load_subspace({str(path)!r}, init_fn)
        assert info["params_match"] and info["digest_verified"], info
        variables = sj.to_params(sub, t)
        preds = jax.jit(lambda v: model.apply(v, X))(variables)
        np.save({str(tmp_path / "preds.npy")!r}, np.asarray(preds))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "preds.npy")
    assert got.tobytes() == np.asarray(preds).tobytes()
    # The trained batch_stats came back, not the initial ones.
    assert not np.array_equal(
        np.asarray(stats["BatchNorm_0"]["var"]),
        np.asarray(sub.other_collections["batch_stats"]["BatchNorm_0"]["var"]),
    )


@pytest.mark.slow  # trains the module's model, or rebuilds fastfood states
def test_reload_in_process_is_bit_identical(saved):
    path, header, sub, t, stats, preds = saved
    sub2, t2, info = sj.load_subspace(path, init_fn)
    assert bits(t2) == bits(t) and bits(sub2.theta0) == bits(sub.theta0)
    assert bits(sub2.proj_states) == bits(sub.proj_states)
    assert bits(sub2.other_collections) == bits({"batch_stats": stats})
    assert info["params_match"] and info["platform_differences"] == []
    again = jax.jit(lambda v: model.apply(v, X))(sj.to_params(sub2, t2))
    assert np.asarray(again).tobytes() == np.asarray(preds).tobytes()


@pytest.mark.slow  # trains the module's model, or rebuilds fastfood states
def test_the_file_format(saved):
    path, header, sub, *_ = saved
    header, arrays, has_digest = read_archive(path)
    assert has_digest and header["format"] == "subspace-jax-compressed"
    assert header["version"] == 3
    lay = header["layout"]
    assert [leaf["label"] for leaf in lay["leaves"]] == ["project"] * 6
    assert lay["collections"] == ["params"] and not lay["said"]
    assert lay["groups"][0]["projection"] == {"name": "fastfood", "options": {}}
    assert lay["groups"][0]["dim"] == 20 and header["num_params"] == sub.num_params
    k_model, k_proj = jax.random.split(jax.random.key(7))
    assert header["keys"]["projection"]["data"] == [
        int(x) for x in np.asarray(jax.random.key_data(k_proj))
    ]
    assert [o["path"] for o in header["others"]] == [
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
    ]
    assert arrays["w"].shape == (20,) and arrays["w"].dtype == np.float32


@pytest.mark.slow  # trains the module's model, or rebuilds fastfood states
def test_wrong_init_fn_or_template_is_refused(saved):
    path, *_ = saved
    other = lambda k: init_fn(jax.random.fold_in(k, 1))  # noqa: E731
    with pytest.raises(CompressedModelError, match="does not rebuild the saved theta0"):
        sj.load_subspace(path, other)
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    with pytest.raises(CompressedModelError, match="does not store theta0"):
        sj.load_subspace(path, shapes)
    # The theta0 itself, as a template, is accepted (checked by its digest).
    k_model, _ = jax.random.split(jax.random.key(7))
    sub, t, info = sj.load_subspace(path, init_fn(k_model))
    assert info["params_match"]

    wide = ns["nn"].Dense(4)
    with pytest.raises(CompressedModelError, match="parameters are not the saved ones"):
        sj.load_subspace(path, lambda k: {**wide.init(k, X[:1]), "batch_stats": {}})


@pytest.mark.slow  # trains the module's model, or rebuilds fastfood states
def test_damaged_and_altered_files_are_one_error(saved, tmp_path):
    path, *_ = saved
    data = path.read_bytes()
    header, arrays, _ = read_archive(path)
    cases = {
        "cut": (lambda p: p.write_bytes(data[: len(data) // 2]), "is incomplete"),
        "empty": (lambda p: p.write_bytes(b""), "is empty"),
        "w altered, sealed": (
            lambda p: write_archive(p, header, {**arrays, "w": arrays["w"] * 3}),
            "altered after saving",
        ),
        "stats altered, sealed": (
            lambda p: write_archive(p, header, {**arrays, "other_1": arrays["other_1"] + 1}),
            "altered after saving",
        ),
        "byte flipped": (
            lambda p: p.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:]),
            "does not match the digest",
        ),
        "array missing": (
            lambda p: write_archive(p, header, {k: v for k, v in arrays.items() if k != "w"}),
            r"lacks the arrays \['w'\]",
        ),
        "header field missing": (
            lambda p: write_archive(p, {k: v for k, v in header.items() if k != "layout"}, arrays),
            "header lacks 'layout'",
        ),
    }
    for i, (case, (make, message)) in enumerate(cases.items()):
        p = tmp_path / f"case{i}.npz"
        make(p)
        with pytest.raises(CompressedModelError, match=message) as err:
            sj.load_subspace(p, init_fn)
        assert str(p) in str(err.value), case


@pytest.mark.slow  # trains the module's model, or rebuilds fastfood states
def test_stored_theta0_and_projection_objects_with_options(tmp_path):
    """No init_fn and no key: theta0 and P are stored; a factory's options are recorded."""
    theta0 = {"a": jnp.linspace(-1, 1, 30, dtype=jnp.bfloat16).reshape(5, 6), "b": jnp.ones(3)}
    proj = sj.projections.fastfood(shared_signs=False)
    sub = sj.init_subspace(jax.random.key(3), theta0, 6, projection=proj, said=True)
    t = sj.init_trainable(sub)._replace(w=jnp.arange(4, dtype=jnp.float32) / 10)
    path = tmp_path / "m.npz"
    header = sj.save_subspace(path, sub, t)
    assert not header["theta0_reproducible"] and not header["projection_reproducible"]
    assert header["layout"]["groups"][0]["projection"] == {
        "name": "fastfood",
        "options": {"shared_signs": False},
    }
    assert header["dtypes"]["theta0_0"] == "bfloat16"
    shapes = jax.eval_shape(lambda: theta0)
    sub2, t2, info = sj.load_subspace(path, shapes)
    assert info["params_match"] and bits(sub2.theta0) == bits(sub.theta0)
    assert sj.to_params(sub2, t2)["a"].dtype == jnp.bfloat16
    assert bits(sj.to_params(sub2, t2)) == bits(sj.to_params(sub, t))
    # With the key, P is not stored; the options rebuild it.
    header = sj.save_subspace(path, sub, t, key=jax.random.key(3))
    assert header["projection_reproducible"] and not any(
        k.startswith("proj_") for k in header["stored"]
    )
    sub3, t3, info = sj.load_subspace(path, shapes)
    assert info["params_match"] and bits(sub3.proj_states) == bits(sub.proj_states)


def test_unregistered_projection_objects_need_a_name(tmp_path):
    mine = sj.make_projection(
        "mine_unregistered",
        init=lambda k, D, d: jax.random.normal(k, (D, d)) / jnp.sqrt(D),
        mv=lambda M, w: M @ w,
        rmv=lambda M, g: g @ M,
    )
    theta0 = {"a": jnp.ones((4, 3))}
    sub = sj.init_subspace(jax.random.key(0), theta0, 2, projection=mine)
    with pytest.raises(ValueError, match=r"not registered.*register\('mine_unregistered'"):
        sj.save_subspace(tmp_path / "m.npz", sub, sj.init_trainable(sub))
    sj.register("mine_unregistered", mine, overwrite=True)
    try:
        header = sj.save_subspace(
            tmp_path / "m.npz", sub, sj.init_trainable(sub), key=jax.random.key(0)
        )
        assert header["projection_reproducible"]
        _, _, info = sj.load_subspace(tmp_path / "m.npz", theta0)
        assert info["params_match"]
    finally:
        from subspace_jax.projections import _base

        _base._REGISTRY.pop("mine_unregistered", None)
        _base._lookup.cache_clear()


@pytest.mark.slow  # trains the module's model, or rebuilds fastfood states
def test_bad_inputs(saved, tmp_path):
    path, header, sub, t, stats, _ = saved
    with pytest.raises(ValueError, match="init_fn and init_key together"):
        sj.save_subspace(tmp_path / "x.npz", sub, t, init_fn=init_fn)
    with pytest.raises(ValueError, match="not pass-through collections"):
        sj.save_subspace(tmp_path / "x.npz", sub, t, collections={"cache": {}})
    with pytest.raises(ValueError, match="w must have shape"):
        sj.save_subspace(tmp_path / "x.npz", sub, t._replace(w=jnp.zeros(3)))
    nan = t._replace(w=t.w.at[0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"non-finite values in w \(1 of 20\)"):
        sj.save_subspace(tmp_path / "x.npz", sub, nan)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        sj.load_subspace(tmp_path / "none.npz", init_fn)
    json.dumps(header)  # the returned header is plain JSON


def test_a_projection_object_its_name_does_not_rebuild_is_refused(tmp_path):
    dense = sj.get_projection("dense")
    fake = sj.make_projection(  # named "dense", but twice the registered dense projection
        "dense",
        init=dense.init,
        mv=lambda s, w: 2.0 * dense.apply(s, w),
        rmv=lambda s, g: 2.0 * dense.transpose(s, g),
    )
    sub = sj.init_subspace(jax.random.key(0), {"a": jnp.ones((4, 3))}, 2, projection=fake)
    t = sj.init_trainable(sub)._replace(w=jnp.ones(2, jnp.float32))
    with pytest.raises(ValueError, match="would not rebuild this model"):
        sj.save_subspace(tmp_path / "m.npz", sub, t, key=jax.random.key(0))
    assert list(tmp_path.iterdir()) == []
