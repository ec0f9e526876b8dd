"""Results you can trust: outputs checked up front, runs keyed by config and data, one writer
per results folder, torn JSON lines repaired, and bad input as one ``error:`` line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _checks import load_script

from subspace_jax import _results, cli
from subspace_jax._lock import FolderLocked, lock_folder
from subspace_jax.data import DataError, data_fingerprint, load_cifar10, load_dataset, load_idx
from subspace_jax.intrinsic_dim import _sweep, config_key
from subspace_jax.train import TrainConfig, TrainOutput
from subspace_jax.train._reuse import NOT_IN_KEY

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--quiet", "--epochs", "1", "--max-steps", "3", "--model", "mlp_small", "--width", "8"]
TINY += ["--batch-size", "32"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def run_cli(args, capsys) -> tuple[int, str]:
    """``cli.main(args)`` -> (exit status, stderr); argparse's own errors included."""
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if any dataset is read."""
    from subspace_jax.data import _dataset

    def refuse(*a, **k):
        raise AssertionError("data was read before the outputs were checked")

    monkeypatch.setattr(_dataset, "_load_raw", refuse)


# --- 3. outputs checked before any work -------------------------------------------------------


@pytest.mark.parametrize(
    "make_args, message",
    [
        (
            lambda t: (
                ["train", "--dim", "5", "--save-compressed", "/missing/dir/x.npz"]
                + ["--out", str(t / "ok")]
            ),
            "'/missing/dir' does not exist",
        ),
        (lambda t: ["train", "--out", str(t / "afile")], "is a file; expected a folder"),
        (lambda t: ["train", "--json", str(t / "adir")], "is a folder; expected a file"),
        (lambda t: ["train", "--json", str(t / "afile" / "x.json")], "is not a folder"),
        (lambda t: ["train", "--out", str(t / "afile" / "sub")], "cannot hold a folder"),
        (
            lambda t: ["train", "--out", str(t / "res"), "--json", str(t / "res" / "result.json")],
            "both write",
        ),
        (lambda t: ["sweep", "--dims", "4", "--out", str(t / "afile")], "is a file"),
        (
            lambda t: ["sweep", "--dims", "4", "--out", str(t / "o"), "--json", str(t / "adir")],
            "is a folder",
        ),
        (lambda t: ["id", "--out", str(t / "adir")], "runs.jsonl' is a folder"),
        (lambda t: ["id", "--out", str(t / "o"), "--json", str(t / "no" / "x.json")], "not exist"),
        (
            lambda t: ["evaluate", "--compressed", str(t / "afile"), "--json", str(t / "afile")],
            "input",
        ),
        (lambda t: ["bench", "--dims", "4", "--json", str(t / "adir")], "is a folder"),
        (lambda t: ["bench", "--dims", "4", "--png", str(t / "no" / "p.png")], "not exist"),
    ],
)
def test_bad_output_paths_fail_before_any_data_is_read(
    tmp_path, capsys, no_data, make_args, message
):
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir" / "runs.jsonl").mkdir(parents=True)
    (tmp_path / "res").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = make_args(tmp_path)
    code, err = run_cli([args[0], "--quiet", *args[1:]], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert message in error_lines(err)[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no .tmp, no `ok` folder
    assert (tmp_path / "afile").read_text() == "keep me"


def _replace_folder_by_file_after_training(monkeypatch, folder: Path):
    """After training, ``folder`` becomes a file: every write into it fails."""
    import subspace_jax.train as train_pkg

    real = train_pkg.train_and_evaluate

    def train_then_break(*a, **k):
        out = real(*a, **k)
        for p in folder.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()  # a checkpoint folder too
        folder.rmdir()
        folder.write_text("not a folder any more")
        return out

    monkeypatch.setattr(train_pkg, "train_and_evaluate", train_then_break)


@pytest.mark.slow
def test_a_write_that_fails_after_training_goes_to_a_fallback_file(tmp_path, capsys, monkeypatch):
    from subspace_jax.compress import load_compressed

    work, dest = tmp_path / "work", tmp_path / "dest"
    work.mkdir()
    dest.mkdir()
    monkeypatch.chdir(work)
    _replace_folder_by_file_after_training(monkeypatch, dest)
    args = ["train", *TINY, "--dim", "6", "--json", str(dest / "r.json")]
    code, err = run_cli([*args, "--save-compressed", str(dest / "m.npz")], capsys)
    assert code == cli.EXIT_WRITE_FAILED and "Traceback" not in err
    saved = {p.suffix: p for p in work.iterdir()}
    assert set(saved) == {".json", ".npz"}, sorted(work.iterdir())
    for p in saved.values():
        assert p.name.startswith("subspace-jax-") and str(p) in err
    result = json.loads(saved[".json"].read_text())
    assert result["dim"] == 6 and result["model"] == "mlp_small"
    params, info = load_compressed(saved[".npz"])
    assert info["projection"]["dim"] == 6


# --- 4. runs identified by their config and their data ---------------------------------------


def _other_value(name, value):
    """A different valid value for a TrainConfig field."""
    changes = {
        "model": "mlp2",
        "dataset": "mnist",
        "projection": "fastfood",
        "per_layer": True,
        "optimizer": "sgd",
        "lr": 0.5,
        "epochs": 3,
        "batch_size": 64,
        "l2": 1e-4,
        "val_size": 100,
        "image_size": 32,
        "max_steps": 7,
        "data_seed": 5,
        "model_overrides": {"width": 9},
        "burn_in_steps": 2,
        "said": True,
        "lottery_every": 3,
        "on_divergence": "retry",
        "max_retries": 5,
        "augment": True,
        "classes": (5, 6, 7),
        "reinit_head": True,
    }
    return changes[name]


def test_config_key_holds_every_config_field_and_the_data(tmp_path):
    base = TrainConfig(dim=5)
    key = config_key(base, data="a")
    assert config_key(base, data="b") != key  # other data
    assert config_key(dataclasses.replace(base, data_dir="/elsewhere"), data="a") == key
    assert config_key(dataclasses.replace(base, seeds=(3,), dim=9), data="a") == key
    skipped = {*NOT_IN_KEY, "theta0_path"}  # theta0_path: by its contents, below
    for field in dataclasses.fields(TrainConfig):
        if field.name in skipped:
            continue
        other = dataclasses.replace(base, **{field.name: _other_value(field.name, None)})
        assert config_key(other, data="a") != key, field.name
    # A theta0 checkpoint enters by its contents, not its name.
    ckpt = tmp_path / "t.npz"
    ckpt.write_bytes(b"one")
    k1 = config_key(dataclasses.replace(base, theta0_path=str(ckpt)), data="a")
    ckpt.write_bytes(b"two")
    assert config_key(dataclasses.replace(base, theta0_path=str(ckpt)), data="a") != k1


def test_data_fingerprint_is_sizes_and_a_hash_of_the_arrays():
    ds = load_dataset("digits")
    fp = ds.fingerprint
    assert fp == data_fingerprint(ds._replace(fingerprint=None))  # same rule both ways
    assert fp.startswith("3500+500+1000:")
    x = ds.x_train.copy()
    x[0, 0, 0, 0] += 1.0
    assert data_fingerprint(ds._replace(x_train=x, fingerprint=None)) != fp
    y = ds.y_test.copy()
    y[0] = (y[0] + 1) % 10
    assert data_fingerprint(ds._replace(y_test=y, fingerprint=None)) != fp
    # The stored field is never trusted: a cut dataset keeps it but gets its own fingerprint.
    cut = ds._replace(x_train=ds.x_train[:500], y_train=ds.y_train[:500])
    assert cut.fingerprint == fp and data_fingerprint(cut).startswith("500+500+1000:")


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def make_mnist(folder: Path, seed: int, n_train=120, n_test=40) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train))
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))
    return folder


class CountingTrainer:
    """Stands in for ``train_and_evaluate``: records what was trained, trains nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, data=None, *, progress=None, **kwargs):
        self.calls.append((config.dim, tuple(config.seeds), data_fingerprint(data)))
        n = len(config.seeds)
        result = {
            "model": config.model,
            "dataset": config.dataset,
            "projection": config.projection if config.dim else "none",
            "num_params": 1000,
            "dim": config.dim,
            "val_accuracy": 0.5,
            "per_seed": [
                {"seed": s, "val_accuracy": 0.5, "best_val_accuracy": 0.5, "test_accuracy": 0.5}
                for s in config.seeds
            ],
            "history": [
                {
                    "per_seed_val_loss": [1.0] * n,
                    "per_seed_val_accuracy": [0.5] * n,
                    "per_seed_train_loss": [1.0] * n,
                }
            ],
            "step_time_ms": 1.0,
            "peak_memory_bytes": 0,
            "wall_time_s": 0.0,
            "learning_rate": 0.03,
            "data_fingerprint": data_fingerprint(data),
        }
        return TrainOutput(result, None)


@pytest.mark.slow
def test_sweep_retrains_on_other_data_and_reuses_the_same_data_elsewhere(
    tmp_path, monkeypatch, capsys
):
    trainer = CountingTrainer()
    monkeypatch.setattr(_sweep, "train_and_evaluate", trainer)
    a = make_mnist(tmp_path / "a", seed=0)
    b = make_mnist(tmp_path / "b", seed=1)  # same sizes, other pixels
    a_copy = tmp_path / "copy_of_a"
    a_copy.mkdir()
    for f in a.iterdir():
        (a_copy / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "sweep"
    base = ["sweep", "--quiet", "--dataset", "mnist", "--val-size", "20", "--batch-size", "16"]
    base += ["--dims", "4", "--out", str(out)]

    def sweep(folder):
        assert cli.main([*base, "--data-dir", str(folder)]) == 0
        return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]

    assert len(sweep(a)) == 2 and len(trainer.calls) == 2
    records = sweep(b)
    assert len(records) == 4 and len(trainer.calls) == 4  # other data: trained again
    assert records[0]["data_fingerprint"] != records[2]["data_fingerprint"]
    assert len(sweep(a_copy)) == 4 and len(trainer.calls) == 4  # same data elsewhere: reused
    sweep_json = json.loads((out / "sweep.json").read_text())
    assert sweep_json["config"]["data_dir"] == str(a_copy)
    assert {r["data_fingerprint"] for r in sweep_json["runs"]} == {records[0]["data_fingerprint"]}


def write_cifar_bin(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        records = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / f"{name}.bin").write_bytes(records.tobytes())


def test_cifar_batch_cut_at_a_record_boundary_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar_bin(folder, n=6)
    assert load_cifar10(tmp_path).x_train.shape == (30, 32, 32, 3)
    cut = folder / "data_batch_3.bin"
    cut.write_bytes(cut.read_bytes()[: 3 * 3073])  # half the records, whole records only
    with pytest.raises(DataError, match="data_batch_3.bin: 3 images, but the other batches"):
        load_cifar10(tmp_path)
    write_cifar_bin(folder, n=6)
    test = folder / "test_batch.bin"
    test.write_bytes(test.read_bytes()[:3073])
    with pytest.raises(DataError, match="test_batch.bin: 1 images"):
        load_cifar10(tmp_path)


def test_idx_file_with_fewer_records_than_its_header_is_an_error_naming_it(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((10, 28, 28)))
    path.write_bytes(path.read_bytes()[: -2 * 28 * 28])  # two whole records short
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: payload is .*\(truncated file"):
        load_idx(path)


@pytest.mark.slow
def test_experiment_runner_retrains_a_train_run_whose_config_or_data_changed(tmp_path):
    run = load_script("experiments/run.py")
    out = tmp_path / "r.json"
    args = ["train", *TINY, "--dim", "5", "--json", str(out)]
    assert cli.main(args) == 0
    assert run.stale_reason(args, out) is None
    edited = [*args[:-2], "--lr", "0.5", "--json", str(out)]
    assert run.stale_reason(edited, out) == "its config changed"
    result = json.loads(out.read_text())
    result["data_fingerprint"] = "3500+500+1000:0000000000000000"
    out.write_text(json.dumps(result))
    assert run.stale_reason(args, out) == "its data changed"
    out.write_text('{"config": ')  # torn
    assert run.stale_reason(args, out) == "its JSON is unreadable"


# --- 5. one writer per results folder; torn lines -----------------------------------------------


def test_a_second_process_on_a_locked_out_gets_an_error_naming_the_holder(
    tmp_path, capsys, no_data
):
    out = tmp_path / "out"
    with lock_folder(out):
        for cmd in (["sweep", "--dims", "4"], ["id"]):
            code, err = run_cli([*cmd, "--quiet", "--out", str(out)], capsys)
            assert code == 2 and len(error_lines(err)) == 1, err
            assert f"in use by process {os.getpid()}" in err and "--wait" in err
    assert not (out / "runs.jsonl").exists()


def test_lock_waits_for_the_holder_with_wait(tmp_path):
    out = tmp_path / "out"
    released = threading.Event()

    def hold():
        with lock_folder(out):
            time.sleep(0.5)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    messages = []
    with pytest.raises(FolderLocked):
        with lock_folder(out):
            pass
    with lock_folder(out, wait=True, on_wait=messages.append):
        assert released.is_set()
    holder.join()
    assert len(messages) == 1 and "waiting for process" in messages[0]


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, signal, sys; from subspace_jax._lock import lock_folder\n"
        "with lock_folder(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".lock").read_text().strip().isdigit()  # the dead holder's pid is still there
    with lock_folder(out) as path:
        assert path.read_text().strip() == str(os.getpid())


def test_a_torn_last_line_is_reported_and_repaired_before_appending(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    _results.append_jsonl(path, {"dim": 1, "seed": 0})
    with open(path, "ab") as f:
        f.write(b'{"dim": 2, "se')  # an append killed half-way
    assert _results.read_jsonl(path) == [{"dim": 1, "seed": 0}]  # never trusted
    _results.append_jsonl(path, {"dim": 3, "seed": 0})
    err = capsys.readouterr().err
    assert "torn last line" in err and str(path) in err
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"dim": 1, "seed": 0}, {"dim": 3, "seed": 0}]
    # A complete JSON object without its newline is torn too: not trusted, then removed.
    with open(path, "ab") as f:
        f.write(b'{"dim": 4, "seed": 0}')
    assert len(_results.read_jsonl(path)) == 2
    assert _results.repair_jsonl(path) == len('{"dim": 4, "seed": 0}')
    assert _results.repair_jsonl(path) == 0 and len(path.read_text().splitlines()) == 2


def test_runs_jsonl_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _results.append_jsonl(tmp_path / "runs.jsonl", {"dim": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "runs.jsonl").stat().st_mode & 0o777 == 0o644


# --- 6. every plausible bad input is one error line --------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--batch-size", "5000"], "batch size 5000 is larger than the training split"),
        (["train", "--val-size", "3999"], "batch size 32 is larger than the training split"),
        (["train", "--val-size", "0"], "val_size must be >= 1"),
        (["train", "--val-size", "4000"], "val_size=4000 out of range"),
        (["train", "--seeds", "99999999999999999999999"], "too big for a PRNG seed"),
        (["train", "--seeds", "4294967296"], "too big for a PRNG seed"),
        (["train", "--seeds", "0-99999999999"], "more than 10000 values"),
        (["sweep", "--dims", "1-99999999999"], "more than 10000 values"),
        (["train", "--data-seed", "99999999999999999999999"], "too big for a PRNG seed"),
        (["sweep", "--dims", "4", "--fraction", "2"], "fraction must be in (0, 1]"),
        (["id", "--fraction", "1.5"], "fraction must be in (0, 1]"),
        (["id", "--bootstrap", "99999999999999"], "must be <= 1000000"),
        (["bench", "--dims", "4", "--dim-caps", "dense=-5"], "a cap must be >= 1"),
    ],
)
def test_plausible_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    if args[0] == "bench":
        full = [*args, "--isolate", "none", "--quiet"]
    else:
        full = [args[0], *TINY, *args[1:]]
    code, err = run_cli(full, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert message in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1
    assert not list(tmp_path.iterdir())  # nothing trained or written
