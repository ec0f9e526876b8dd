"""The command line: JSON contracts, reproducibility, vmapped seeds, resumable sweeps, errors."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from subspace_jax import cli
from subspace_jax.intrinsic_dim import interpolate_crossing

TINY = ["--quiet", "--epochs", "1", "--max-steps", "15", "--batch-size", "64"]
TRAIN_FIELDS = {
    "model",
    "dataset",
    "projection",
    "num_params",
    "dim",
    "val_accuracy",
    "best_val_accuracy",
    "test_accuracy",
    "step_time_ms",
    "peak_memory_bytes",
    "wall_time_s",
    "seeds",
    "history",
    "per_seed",
}


def run_json(tmp_path, args, name="out.json"):
    path = tmp_path / name
    assert cli.main([*args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.slow
def test_train_json_contract(tmp_path):
    res = run_json(tmp_path, ["train", *TINY, "--dim", "20", "--projection", "dense"])
    assert TRAIN_FIELDS <= set(res)
    assert res["model"] == "mlp" and res["dataset"] == "digits" and res["projection"] == "dense"
    assert res["num_params"] == 159_010 and res["dim"] == 20 and res["seeds"] == [0]
    assert 0.0 <= res["val_accuracy"] <= 1.0 and res["step_time_ms"] > 0
    assert res["peak_memory_bytes"] > 0 and len(res["history"]) == 1
    assert res["history"][0]["steps"] == 15


@pytest.mark.slow
def test_train_same_seed_is_reproducible_and_vmapped_seeds_match_single_runs(tmp_path):
    args = ["train", *TINY, "--dim", "30", "--projection", "sparse_very"]
    a = run_json(tmp_path, [*args, "--seeds", "1"], "a.json")
    b = run_json(tmp_path, [*args, "--seeds", "1"], "b.json")
    timing = {"epoch_time_s"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in a["history"]] == [
        {k: v for k, v in h.items() if k not in timing} for h in b["history"]
    ]
    assert a["val_accuracy"] == b["val_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
    both = run_json(tmp_path, [*args, "--seeds", "0,1"], "both.json")
    assert [s["seed"] for s in both["per_seed"]] == [0, 1]
    one = both["per_seed"][1]
    # Seeds share the batch order, so seed 1 trained beside seed 0 is seed 1 trained alone.
    assert one["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=2e-3)
    assert both["val_accuracy"] == pytest.approx(
        np.mean([s["val_accuracy"] for s in both["per_seed"]])
    )


@pytest.mark.slow
def test_sweep_writes_results_plot_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--dims", "4,16", "--out", str(out)]
    res = run_json(tmp_path, args, "sweep.json")
    assert set(res) >= {"baseline", "runs", "d_int90", "definition"}
    assert [r["dim"] for r in res["runs"]] == [4, 16]
    assert "0.9" in res["definition"] and "interpolated" in res["definition"]
    assert (out / "sweep.png").stat().st_size > 1000
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 3  # baseline + two dims, one seed
    again = run_json(tmp_path, args, "again.json")
    assert (out / "runs.jsonl").read_text().splitlines() == lines  # nothing retrained
    assert again["runs"] == res["runs"]


@pytest.mark.slow
def test_interrupted_sweep_keeps_finished_runs(tmp_path, monkeypatch):
    from subspace_jax.intrinsic_dim import _sweep

    real = _sweep.train_and_evaluate
    calls = []

    def flaky(config, *a, **k):
        calls.append(config.dim)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(config, *a, **k)

    monkeypatch.setattr(_sweep, "train_and_evaluate", flaky)
    out = tmp_path / "sw"
    code = cli.main(["sweep", *TINY, "--dims", "4,8,16", "--out", str(out)])
    assert code == 130
    saved = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["dim"] for r in saved] == [0, 4]


def test_interpolate_crossing():
    assert interpolate_crossing([10, 100], [0.5, 0.9], 0.9) == pytest.approx(100)
    # Halfway in accuracy between 10 and 1000 is 100 on a log scale.
    assert interpolate_crossing([10, 1000], [0.0, 1.0], 0.5) == pytest.approx(100)
    assert interpolate_crossing([10, 100], [0.95, 0.99], 0.9) == 10
    assert interpolate_crossing([10, 100], [0.1, 0.2], 0.9) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "resnet"], "unknown model 'resnet'"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--dim", "5", "--projection", "nope"], "unknown projection 'nope'"),
        (["train", "--dim", "999999", "--projection", "orthogonal"], "out of range"),
        (["train", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "is not a directory"),
        (["train", "--seeds", "zero"], "cannot parse seeds"),
        (["train", "--seeds", "1,1"], "seeds must be distinct"),
        (["sweep", "--dims", "a,b"], "cannot parse dims"),
        (["sweep", "--dims", "0,4"], "dims must be >= 1"),
    ],
)
def test_bad_input_is_a_short_error(args, message, capsys):
    assert cli.main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "abc"])
def test_bad_learning_rate_is_rejected_by_the_parser(lr, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--lr", lr])
    assert e.value.code == 2
    assert "--lr" in capsys.readouterr().err


@pytest.mark.slow
def test_corrupt_data_file_is_a_short_error_from_the_real_entry_point(tmp_path):
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03garbage")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "subspace_jax",
            "train",
            "--quiet",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and str(tmp_path) in proc.stderr


def test_projections_command_lists_registry(capsys):
    assert cli.main(["projections"]) == 0
    out = capsys.readouterr().out
    assert "dense " in out and "sparse_very" in out


def test_bad_dim_is_reported_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    from subspace_jax.train import _loop

    def no_data(config):
        raise AssertionError("data was read before the sizes were checked")

    monkeypatch.setattr(_loop, "load_data", no_data)
    args = ["train", "--quiet", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    assert cli.main([*args, "--dim", "9999999", "--projection", "orthogonal"]) == 2
    assert "d = 9999999 is out of range" in capsys.readouterr().err
