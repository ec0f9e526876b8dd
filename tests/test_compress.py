"""Compressed models: seed + configs + w rebuild the trained parameters bit for bit."""

import dataclasses
import hashlib
import json
import os
import stat
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_jax as sj
from subspace_jax import cli
from subspace_jax.compress import (
    CompressedModelError,
    _probe_distance,
    _write_archive,
    compressed_size_report,
    evaluate_compressed,
    load_compressed,
    params_probe,
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
    result, trained = train_and_evaluate(CONFIG, data)
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
        np.testing.assert_array_equal(z["w"], np.asarray(trained.trainables.w[0]))


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
    # Rewritten by hand (np.savez): a version 2 file without its digest is refused.
    np.savez(tmp_path / "tampered.npz", **{**arrays, "w": arrays["w"] + 1})
    with pytest.raises(CompressedModelError, match="has no digest"):
        load_compressed(tmp_path / "tampered.npz")


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


# ---- integrity: atomic writes, the file digest, and every damaged file is one error ---------


def read_archive(path):
    """(header dict, arrays) of a compressed model, read without any check."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(arrays.pop("header").tobytes()), arrays


def test_save_is_sealed_by_a_sha256_of_the_file_and_written_atomically(run, tmp_path):
    _, result, trained, _, _ = run
    path = tmp_path / "m.npz"
    path.write_bytes(b"an older file")
    old_umask = os.umask(0o022)
    try:
        save_compressed(path, result, trained)
    finally:
        os.umask(old_umask)
    data = path.read_bytes()
    # The last 64 bytes are the hex SHA-256 of every byte before them (independent check).
    assert data[-71:-64] == b"sha256:"
    assert data[-64:].decode() == hashlib.sha256(data[:-64]).hexdigest()
    with zipfile.ZipFile(path) as zf:  # still an ordinary zip archive with its comment
        assert zf.comment == data[-71:] and sorted(zf.namelist()) == ["header.npy", "w.npy"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]  # no temporary file left
    header, _ = read_archive(path)
    assert header["version"] == 3 and header["platform"]["jax_version"] == jax.__version__
    _, info = load_compressed(path)
    assert info["digest_verified"] and info["params_match"] and info["platform_differences"] == []


def test_a_diverged_run_is_not_saved(run, tmp_path):
    _, result, trained, _, _ = run
    w = trained.trainables.w.at[0, 3].set(jnp.nan)
    bad = Trained(trained.model, trained.subs, trained.trainables._replace(w=w))
    with pytest.raises(ValueError, match=r"non-finite values in w \(1 of 50\)"):
        save_compressed(tmp_path / "nan.npz", result, bad)
    assert not (tmp_path / "nan.npz").exists() and list(tmp_path.iterdir()) == []


def _sealed(header, arrays):
    """Rewrite with a valid digest: only the checks behind the digest can catch the change."""

    def make(path):
        _write_archive(path, header, arrays)

    return make


def _unsealed(header, arrays):
    def make(path):
        raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
        np.savez(path, header=raw, **arrays)

    return make


def _patched(old, new):
    """Change bytes of the saved file in place (its digest then no longer matches)."""

    def make(path, src):
        data = src.read_bytes()
        assert data.count(old) == 1 and len(old) == len(new)
        path.write_bytes(data.replace(old, new))

    return make


def damaged_files(src):
    """name -> (make(path), what the error says) for damaged or altered copies of ``src``."""
    header, arrays = read_archive(src)
    no_sha = {k: v for k, v in header.items() if k != "params_sha256"}
    v1 = {k: v for k, v in header.items() if k not in ("platform", "params_probe")}
    v1["version"] = 1
    data = src.read_bytes()
    return {
        "w times 3, digest recomputed": (
            _sealed(header, {**arrays, "w": arrays["w"] * 3}),
            "altered after saving",
        ),
        "w times 3, rewritten by np.savez": (
            _unsealed(header, {**arrays, "w": arrays["w"] * 3}),
            "has no digest",
        ),
        "w NaN, digest recomputed": (
            _sealed(header, {**arrays, "w": np.full_like(arrays["w"], np.nan)}),
            r"non-finite values in w \(50 of 50\)",
        ),
        "seed changed, digest recomputed": (
            _sealed({**header, "seed": 1}, arrays),
            "altered after saving",
        ),
        "seed changed in place": (
            lambda p: _patched(b'"seed": 0', b'"seed": 1')(p, src),
            "does not match the digest",
        ),
        "header key missing": (_sealed(no_sha, arrays), "header lacks 'params_sha256'"),
        "header key of the wrong type": (
            _sealed({**header, "seed": "0"}, arrays),
            "header's 'seed' is str",
        ),
        "array missing": (_sealed(header, {}), r"lacks the arrays \['w'\]"),
        "version 1 file with w times 3": (
            _unsealed(v1, {**arrays, "w": arrays["w"] * 3}),
            "altered after saving",
        ),
        "empty": (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
        "cut in half": (lambda p: p.write_bytes(data[: len(data) // 2]), "is incomplete"),
        "last byte missing": (lambda p: p.write_bytes(data[:-1]), "is incomplete"),
        "not a zip file": (lambda p: p.write_bytes(b"{}\n" * 40), "is incomplete"),
        "a directory": (lambda p: p.mkdir(), "is not a file"),
    }


@pytest.mark.filterwarnings("ignore:.*written before file digests:RuntimeWarning")
def test_damaged_files_are_one_error_naming_the_file(run, tmp_path, capsys):
    _, _, _, src, _ = run
    for i, (case, (make, message)) in enumerate(damaged_files(src).items()):
        path = tmp_path / f"case{i}.npz"
        make(path)
        with pytest.raises(CompressedModelError, match=message) as err:
            load_compressed(path)
        assert str(path) in str(err.value), case
        # The CLI: one error line naming the file, exit 2, never an accuracy.
        assert cli.main(["evaluate", "--compressed", str(path)]) == 2, case
        out, errout = capsys.readouterr()
        assert out == "" and "test acc" not in errout, case
        lines = [ln for ln in errout.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and str(path) in lines[0], (case, errout)


def test_version_1_file_loads_with_a_warning(run, tmp_path, capsys):
    _, result, _, src, _ = run
    header, arrays = read_archive(src)
    v1 = {k: v for k, v in header.items() if k not in ("platform", "params_probe")}
    _unsealed({**v1, "version": 1}, arrays)(tmp_path / "v1.npz")
    with pytest.warns(RuntimeWarning, match="format version 1 file, written before file digests"):
        params, info = load_compressed(tmp_path / "v1.npz")
    assert info["params_match"] and not info["digest_verified"]
    assert bits_equal(params, load_compressed(src)[0])
    assert cli.main(["evaluate", "--compressed", str(tmp_path / "v1.npz")]) == 0
    errout = capsys.readouterr().err
    assert "warning: " in errout and "written before file digests" in errout


def test_platform_note_only_when_the_platform_differs(run, tmp_path, capsys):
    _, result, _, src, _ = run
    header, arrays = read_archive(src)
    # Saved here: no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = load_compressed(src)
    assert info["params_match"] and info["platform_differences"] == []
    assert cli.main(["evaluate", "--compressed", str(src)]) == 0
    assert "warning" not in capsys.readouterr().err
    # Recorded on another JAX version, same parameters: noted in info, but nothing to warn of.
    other = {**header, "platform": {**header["platform"], "jax_version": "0.0.1"}}
    _sealed(other, arrays)(tmp_path / "same.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = load_compressed(tmp_path / "same.npz")
    assert info["params_match"]
    assert info["platform_differences"] == [f"jax_version '0.0.1' -> {jax.__version__!r}"]
    # Rounding-level differences (w off by 1e-6): a warning; it blames the platform only when
    # the platform differs.
    nudged = {**arrays, "w": arrays["w"] * np.float32(1 + 1e-6)}
    _sealed(header, nudged)(tmp_path / "nudged_here.npz")
    _sealed(other, nudged)(tmp_path / "nudged_there.npz")
    for path, blame in [("nudged_here.npz", False), ("nudged_there.npz", True)]:
        with pytest.warns(RuntimeWarning, match="by rounding only") as rec:
            _, info = load_compressed(tmp_path / path)
        assert len(rec) == 1 and not info["params_match"] and info["params_distance"] < 1e-5
        assert ("saved on another platform (jax_version '0.0.1' -> " in str(rec[0].message)) == (
            blame
        )
        assert cli.main(["evaluate", "--compressed", str(tmp_path / path)]) == 0
        lines = capsys.readouterr().err.splitlines()
        assert [ln for ln in lines if ln.startswith("warning:")] == [f"warning: {rec[0].message}"]
    # Another model (w times 3) is an error even when the platform differs.
    _sealed(other, {**arrays, "w": arrays["w"] * 3})(tmp_path / "other_model.npz")
    with pytest.raises(CompressedModelError, match="this platform does not rebuild the saved"):
        load_compressed(tmp_path / "other_model.npz")


def test_params_probe_estimates_the_relative_distance(run):
    _, _, trained, _, _ = run
    params = jax.jit(sj.to_params)(seed_slice(trained.subs), seed_slice(trained.trainables))
    probe = params_probe(params)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])
    assert probe["norm"] == pytest.approx(np.linalg.norm(flat), rel=1e-12)
    # The projections themselves: V drawn leaf by leaf (each leaf is under one block).
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal((8, x.size)) for x in jax.tree.leaves(params)], 1)
    np.testing.assert_allclose(probe["values"], v @ flat, rtol=1e-9)
    rng = np.random.default_rng(1)
    for rel in [1e-6, 1e-3, 0.3]:
        scale = rel * np.linalg.norm(flat) / np.sqrt(D)  # ||delta|| ~ rel ||theta||
        moved = jax.tree.map(lambda x, s=scale: x + s * rng.standard_normal(x.shape), params)
        # sqrt(chi2_8 / 8) lies in [0.4, 1.8] with probability > 0.999.
        assert 0.4 * rel < _probe_distance(probe, moved) < 1.8 * rel


def test_a_compressed_model_is_a_save_subspace_file(run):
    """Format version 3: load_subspace reads the CLI's file with the model's own init."""
    _, _, trained, path, header = run
    assert header["version"] == 3
    assert header["layout"]["groups"][0]["projection"] == {"name": "dense", "options": {}}
    model = from_config(header["model_config"])
    sub, t, info = sj.load_subspace(path, model.init)
    assert info["params_match"]
    want = jax.jit(sj.to_params)(seed_slice(trained.subs), seed_slice(trained.trainables))
    assert bits_equal(jax.jit(sj.to_params)(sub, t), want)
