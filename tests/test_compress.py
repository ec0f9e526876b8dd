"""Compressed models: seed + configs + w rebuild the trained parameters bit for bit."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_jax as sj
from subspace_jax import cli
from subspace_jax.compress import (
    compressed_size_report,
    evaluate_compressed,
    load_compressed,
    save_compressed,
)
from subspace_jax.models import from_config
from subspace_jax.train import TrainConfig, Trained, load_data, train_and_evaluate

# Every test uses the module's trained run (end to end): the whole file is in the slow tier.
pytestmark = pytest.mark.slow

# mlp_small of width 32 on digits: D = (784 + 10 + 1) * 32 + 10 = 25,450 parameters.
CONFIG = TrainConfig(
    model="mlp_small",
    model_overrides={"width": 32},
    dataset="digits",
    dim=50,
    projection="dense",
    epochs=1,
    batch_size=64,
    max_steps=50,
    val_size=200,
    seeds=(0, 3),  # two seeds trained together: seed_index 1 is saved too
)
D = 25_450


def bits_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True)
    )


def seed_slice(tree, i=0):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = load_data(CONFIG)
    result, trained = train_and_evaluate(CONFIG, data, return_state=True)
    path = tmp_path_factory.mktemp("compressed") / "model.npz"
    header = save_compressed(path, result, trained)
    return data, result, trained, path, header


def test_load_rebuilds_the_trained_parameters_bit_for_bit(run):
    data, result, trained, path, header = run
    assert result["num_params"] == D and result["steps"] == 50
    params, info = load_compressed(path)
    want = jax.jit(sj.to_params)(seed_slice(trained.subs), seed_slice(trained.trainables))
    assert bits_equal(params, want)
    assert info["params_match"] and info["theta0_reproducible"]
    assert info["projection_reproducible"] and info["stored"] == ["w"]
    # The same predictions on the test set, and the accuracy the training run reported.
    model = from_config(info["model_config"])
    x = jnp.asarray(data.x_test)
    got_logits = np.asarray(jax.jit(model.apply)(params, x))
    want_logits = np.asarray(jax.jit(trained.model.apply)(want, x))
    assert got_logits.tobytes() == want_logits.tobytes()
    acc = float(np.mean(got_logits.argmax(-1) == data.y_test))
    assert acc == pytest.approx(result["per_seed"][0]["test_accuracy"], abs=1e-6)
    assert evaluate_compressed(path, data=data)["test_accuracy"] == pytest.approx(acc)


def test_file_is_small_and_header_complete(run):
    _, result, trained, path, header = run
    report = compressed_size_report(path, D)
    assert report["full_bytes"] == 4 * D
    assert report["file_bytes"] < 4 * D / 20  # ~4 KB against ~100 KB
    assert compressed_size_report(path)["num_params"] == D
    _, info = load_compressed(path)
    assert info["seed"] == 0 and "jax.random.split(jax.random.key(seed))" in info["key_rule"]
    assert info["model_config"] == trained.model.config
    assert info["train_config"] == CONFIG.to_dict()
    assert info["input_shape"] == [28, 28, 1]
    proj = info["projection"]
    assert (proj["name"], proj["per_layer"], proj["dim"], proj["said"]) == (
        "dense",
        False,
        50,
        False,
    )
    assert [g["size"] for g in proj["groups"]] == [D]
    with np.load(path, allow_pickle=False) as z:
        assert z["w"].dtype == np.float32 and z["w"].shape == (50,)
        np.testing.assert_array_equal(z["w"], np.asarray(trained.trainables["w"][0]))


def test_second_seed_of_a_batch(run, tmp_path):
    _, result, trained, _, _ = run
    path = tmp_path / "seed3.npz"
    header = save_compressed(path, result, trained, seed_index=1)
    assert header["seed"] == 3 and header["stored"] == ["w"]
    params, info = load_compressed(path)
    want = jax.jit(sj.to_params)(seed_slice(trained.subs, 1), seed_slice(trained.trainables, 1))
    assert bits_equal(params, want) and info["params_match"]
    other = jax.jit(sj.to_params)(seed_slice(trained.subs, 0), seed_slice(trained.trainables, 0))
    assert not bits_equal(params, other)


def test_nonreproducible_theta0_and_projection_are_refused_or_stored(run, tmp_path):
    _, result, trained, _, _ = run
    shifted = dataclasses.replace(
        trained.subs, theta0=jax.tree_util.tree_map(lambda x: x + 0.5, trained.subs.theta0)
    )
    moved = Trained(trained.model, shifted, trained.trainables)
    with pytest.raises(ValueError, match="theta0 is not the model's initialisation"):
        save_compressed(tmp_path / "a.npz", result, moved)
    header = save_compressed(tmp_path / "a.npz", result, moved, allow_stored=True)
    assert not header["theta0_reproducible"] and header["projection_reproducible"]
    params, info = load_compressed(tmp_path / "a.npz")
    want = jax.jit(sj.to_params)(seed_slice(shifted), seed_slice(trained.trainables))
    assert bits_equal(params, want) and info["params_match"]

    (state,) = trained.subs.proj_states
    other = dataclasses.replace(trained.subs, proj_states=(state.replace(scale=2 * state.scale),))
    with pytest.raises(ValueError, match="P is stored"):
        save_compressed(
            tmp_path / "b.npz", result, Trained(trained.model, other, trained.trainables)
        )
    header = save_compressed(
        tmp_path / "b.npz",
        result,
        Trained(trained.model, other, trained.trainables),
        allow_stored=True,
    )
    assert header["theta0_reproducible"] and not header["projection_reproducible"]
    params, _ = load_compressed(tmp_path / "b.npz")
    assert bits_equal(
        params, jax.jit(sj.to_params)(seed_slice(other), seed_slice(trained.trainables))
    )
    assert compressed_size_report(tmp_path / "b.npz")["file_bytes"] > 4 * D * 50


def test_bad_inputs_and_tampered_files(run, tmp_path):
    _, result, trained, path, _ = run
    with pytest.raises(ValueError, match="direct run"):
        save_compressed(tmp_path / "x.npz", dataclasses.replace(CONFIG, dim=0), trained)
    with pytest.raises(ValueError, match=r"seed_index must be in \[0, 1\] for 2 seeds"):
        save_compressed(tmp_path / "x.npz", result, trained, seed_index=2)
    with pytest.raises(ValueError, match="TrainConfig or the result dict"):
        save_compressed(tmp_path / "x.npz", {"no": "config"}, trained)
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="not a subspace-jax compressed model"):
        load_compressed(tmp_path / "plain.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["header"].tobytes())
    bumped = np.frombuffer(json.dumps({**header, "version": 99}).encode(), np.uint8)
    np.savez(tmp_path / "v99.npz", **{**arrays, "header": bumped})
    with pytest.raises(ValueError, match="format version 99"):
        load_compressed(tmp_path / "v99.npz")
    # A changed w is caught by the stored digest.
    np.savez(tmp_path / "tampered.npz", **{**arrays, "w": arrays["w"] + 1})
    with pytest.warns(RuntimeWarning, match="differ from the saved ones"):
        _, info = load_compressed(tmp_path / "tampered.npz")
    assert not info["params_match"]


def test_cli_evaluate_and_train_save_compressed(run, tmp_path, capsys):
    _, result, _, path, _ = run
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--compressed", str(path), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["test_accuracy"] == pytest.approx(result["per_seed"][0]["test_accuracy"], abs=1e-6)
    assert ev["params_match"] and ev["num_params"] == D
    assert cli.main(["evaluate", "--compressed", str(tmp_path / "nope.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err

    saved = tmp_path / "cli.npz"
    args = ["train", "--quiet", "--model", "mlp_small", "--width", "8", "--dim", "12"]
    args += ["--max-steps", "3", "--epochs", "1", "--batch-size", "64", "--said"]
    assert (
        cli.main([*args, "--save-compressed", str(saved), "--json", str(tmp_path / "r.json")]) == 0
    )
    trained_json = json.loads((tmp_path / "r.json").read_text())
    assert trained_json["said_scales"] == 4 and trained_json["dim"] == 12
    _, info = load_compressed(saved)
    assert info["params_match"] and info["stored"] == ["said", "w"]
    assert cli.main(["evaluate", "--compressed", str(saved), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["test_accuracy"] == pytest.approx(trained_json["test_accuracy"], abs=1e-6)
