"""Fault injection: SIGKILL at random moments, random truncations and byte flips.

What must hold: nothing half-written is ever read back (a save interrupted at any moment leaves
the previous file or none, and running the command again gives the uninterrupted result), and
a damaged compressed model is one ``error:`` line with exit status 2: never a traceback, never
exit 0, never an accuracy. The helpers live in ``tests/_faults.py``.
"""

import json
import os
import signal
import stat
import time

import numpy as np
import pytest
from _faults import (
    bit_flips,
    byte_changes,
    cli,
    count_events,
    kill_after,
    python_killed_at_event,
    run_cli,
    truncations,
)

from subspace_jax import _results
from subspace_jax import cli as sj_cli
from subspace_jax.compress import (
    CompressedModelError,
    _write_archive,
    load_compressed,
    save_compressed,
)
from subspace_jax.train import TrainConfig, train_and_evaluate

SEED = 20261129  # every random choice below comes from this seed
CONFIG = TrainConfig(
    model="mlp_small",
    model_overrides={"width": 8},
    dataset="digits",
    dim=10,
    projection="dense",
    epochs=1,
    batch_size=64,
    max_steps=3,
    val_size=200,
    seeds=(0, 1),
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two compressed models of one run (seeds 0 and 1), as files."""
    result, trained = train_and_evaluate(CONFIG)
    folder = tmp_path_factory.mktemp("models")
    paths = folder / "seed0.npz", folder / "seed1.npz"
    for i, path in enumerate(paths):
        save_compressed(path, result, trained, seed_index=i)
    return paths


def read_archive(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(arrays.pop("header").tobytes()), arrays


def assert_one_error(code, err, path, out=""):
    """Exit 2, one ``error:`` line naming ``path``, no traceback, no accuracy."""
    assert code == 2, err
    assert "Traceback" not in err and "test acc" not in out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0], err


# ---- damaged compressed models -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stream, damage", enumerate([truncations, byte_changes, bit_flips]))
def test_damaged_compressed_model_is_one_error(models, tmp_path, capsys, stream, damage):
    data = models[0].read_bytes()
    rng = np.random.default_rng([SEED, stream])
    path = tmp_path / "damaged.npz"
    for what, damaged in damage(data, rng, 20):
        path.write_bytes(damaged)
        with pytest.raises(CompressedModelError) as err:
            load_compressed(path)
        assert str(path) in str(err.value), what
        code = sj_cli.main(["evaluate", "--compressed", str(path)])
        out, errout = capsys.readouterr()
        assert out == "", what
        assert_one_error(code, errout, path)


@pytest.mark.slow
def test_damaged_compressed_model_through_the_real_entry_point(models, tmp_path):
    data = models[0].read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: len(data) * 2 // 3])
    proc = run_cli("evaluate", "--compressed", path)
    assert_one_error(proc.returncode, proc.stderr, path, proc.stdout)
    assert "is incomplete" in proc.stderr


# ---- SIGKILL during a save -----------------------------------------------------------------

WRITE_MODEL = """
import json, sys
import numpy as np
from subspace_jax.compress import _write_archive
with np.load(sys.argv[1] if len(sys.argv) > 1 else {src!r}) as z:
    arrays = {{k: z[k] for k in z.files}}
header = json.loads(arrays.pop("header").tobytes())
_write_archive({dest!r}, header, arrays)
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_of_a_save_never_leaves_a_partial_model(models, tmp_path):
    old, new = models
    dest = tmp_path / "model.npz"
    header, arrays = read_archive(new)
    n = count_events(lambda: _write_archive(tmp_path / "count.npz", header, arrays))
    # Events: the temporary file's writes, its fsync, the rename, the folder's fsync.
    assert n > 4
    # One random write of the temporary file, before its fsync, before and after the rename.
    picks = [int(np.random.default_rng(SEED).integers(1, n - 2)), n - 2, n - 1, n]
    code = WRITE_MODEL.format(src=str(new), dest=str(dest))
    for trial, k in enumerate(picks):
        replacing = trial % 2 == 0  # half the trials replace an existing model
        if replacing:
            dest.write_bytes(old.read_bytes())
        else:
            dest.unlink(missing_ok=True)
        proc = python_killed_at_event(int(k), code)
        assert proc.returncode == -signal.SIGKILL, (k, proc.stderr)
        if k < n:  # killed before the rename: the destination is untouched
            if replacing:
                assert dest.read_bytes() == old.read_bytes(), k
            else:
                assert not dest.exists(), k
        else:  # killed after the rename (before the folder's fsync): the complete new model
            assert read_archive(dest)[0]["seed"] == 1, k
        if dest.exists():
            _, info = load_compressed(dest)
            assert info["params_match"]
    # Leftover temporary files are never read as the model; the same save again completes.
    assert all(p.name.startswith(".model.npz.") for p in tmp_path.glob(".*.tmp"))
    _write_archive(dest, header, arrays)
    _, info = load_compressed(dest)
    assert info["seed"] == 1 and info["params_match"]
    np.testing.assert_array_equal(read_archive(dest)[1]["w"], arrays["w"])


@pytest.mark.slow
def test_sigkill_during_a_result_json_write_keeps_the_old_file(tmp_path):
    dest = tmp_path / "result.json"
    obj = {"runs": [{"dim": d, "val_accuracy": d / 100} for d in range(50)]}
    n = count_events(lambda: _results.write_json(tmp_path / "count.json", obj))
    code = f"""
from subspace_jax._results import write_json
write_json({str(dest)!r}, {obj!r})
"""
    rng = np.random.default_rng(SEED + 1)
    for k in [int(rng.integers(1, n - 2)), n - 1]:
        dest.write_text('{"old": true}\n')
        proc = python_killed_at_event(k, code)
        assert proc.returncode == -signal.SIGKILL, (k, proc.stderr)
        assert json.loads(dest.read_text()) == {"old": True}
    _results.write_json(dest, obj)
    assert json.loads(dest.read_text()) == obj


@pytest.mark.slow
def test_sigkill_at_random_moments_of_train_save_compressed(tmp_path):
    """The real command, killed at random moments; then the same command again."""
    model, result = tmp_path / "model.npz", tmp_path / "result.json"
    args = ["train", "--quiet", "--model", "mlp_small", "--width", "8", "--dim", "10"]
    args += ["--max-steps", "3", "--epochs", "1", "--batch-size", "64", "--val-size", "200"]
    args += ["--save-compressed", model, "--json", result]
    start = time.perf_counter()
    proc = run_cli(*args)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    want_w = read_archive(model)[1]["w"]
    want = json.loads(result.read_text())
    rng = np.random.default_rng(SEED + 2)
    reference = model.read_bytes()
    for trial, at in enumerate(rng.uniform(0.3 * seconds, 1.1 * seconds, size=2)):
        if trial == 0:  # from nothing, then over the uninterrupted run's model
            model.unlink()
        else:
            model.write_bytes(reference)
        kill_after(cli(*args), float(at))
        if model.exists():  # the previous model or a finished save: whole either way
            assert model.stat().st_size > 0, at
            np.testing.assert_array_equal(read_archive(model)[1]["w"], want_w)
            assert load_compressed(model)[1]["params_match"]
    # The same command again gives the uninterrupted run's model and accuracy.
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(read_archive(model)[1]["w"], want_w)
    assert json.loads(result.read_text())["test_accuracy"] == want["test_accuracy"]


# ---- result files --------------------------------------------------------------------------


@pytest.mark.slow
def test_result_files_are_0644_and_atomic(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = _results.write_json(tmp_path / "r.json", {"a": 1})
        png = _results.plot_lines(
            tmp_path / "r.png", {"s": ([1, 2], [3, 4])}, xlabel="x", ylabel="y"
        )
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(png.stat().st_mode) == 0o644
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An existing file keeps its permission bits.
    path.chmod(0o600)
    _results.write_json(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]


def test_a_failed_result_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError):
        _results.write_json(tmp_path / "adir", {"a": 1})
    path = _results.write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError):  # not JSON: fails half-way through the dump
        _results.write_json(path, {"a": 2, "b": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "r.json"]
