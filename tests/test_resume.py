"""Resumable training: a run interrupted anywhere resumes from its latest orbax checkpoint and
ends with exactly the numbers of an uninterrupted run."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from subspace_jax.train import (
    CheckpointOptions,
    TrainConfig,
    _resume,
    load_data,
    remove_checkpoints,
    train_and_evaluate,
)

pytest.importorskip("orbax.checkpoint")

# 3500 / 64 = 54 steps an epoch, chunks of 32 + 22.
BASE = TrainConfig(model="mlp_small", epochs=3, batch_size=64, seeds=(0, 1))
TIMING = {"wall_time_s", "step_time_ms", "peak_memory_bytes", "setup_time_s", "epoch_time_s"}


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


class Stop(Exception):
    pass


def _stop_after(step):
    def progress(event):
        if event["event"] == "step" and event["step"] >= step:
            raise Stop

    return progress


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_uninterrupted_numbers(tmp_path):
    config = dataclasses.replace(BASE, dim=30, projection="fastfood")
    data = load_data(config)
    whole = train_and_evaluate(config, data).result
    options = CheckpointOptions(tmp_path / "ckpt", every_steps=20)
    with pytest.raises(Stop):  # killed after the chunk ending at step 86 (epoch 2, mid-way)
        train_and_evaluate(config, data, progress=_stop_after(86), checkpoint=options)
    folder = _resume.run_directory(options, config, data) / "group-0"
    assert sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) == [54, 86]
    events = []
    resumed = train_and_evaluate(config, data, progress=events.append, checkpoint=options).result
    assert [e["step"] for e in events if e["event"] == "step"] == [108, 140, 162]
    assert any(
        "resuming seeds [0, 1] from the checkpoint at step 86" in e.get("text", "") for e in events
    )
    assert _untimed(resumed) == _untimed(whole)
    # Another config (or other data) never resumes this one's checkpoint.
    other = dataclasses.replace(config, lr=0.5)
    assert _resume.run_directory(options, other, data) != _resume.run_directory(
        options, config, data
    )
    remove_checkpoints(options, config, data)
    assert not (tmp_path / "ckpt").exists()


ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    sys.executable, "-m", "subspace_jax", "train", "--model", "mlp_small", "--epochs", "4",
    "--batch-size", "64", "--seeds", "0,1", "--dim", "40", "--projection", "fastfood",
]  # fmt: skip


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_train_killed_after_its_second_epoch_resumes_only_the_remaining_steps(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run([*TRAIN, "--out", str(ref), "--quiet"], check=True, env=_env())
    whole = json.loads((ref / "result.json").read_text())

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*TRAIN, "--out", str(out)], env=_env(), stderr=subprocess.PIPE, text=True
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.strip().startswith("epoch   2"):
            break
    # The epoch's checkpoint was started before its line was printed; orbax writes it in the
    # background and renames its folder to the step when complete.
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("*/group-0/108")):
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert not (out / "result.json").exists()
    ckpt = out / "checkpoints"
    assert ckpt.is_dir()

    rerun = subprocess.run(
        [*TRAIN, "--out", str(out)], env=_env(), capture_output=True, text=True, check=True
    )
    assert "from the checkpoint at step 108 of 216" in rerun.stderr, rerun.stderr
    epochs = [ln for ln in rerun.stderr.splitlines() if ln.strip().startswith("epoch")]
    assert [ln.split()[1] for ln in epochs] == ["3", "4"]  # only the remaining epochs ran
    resumed = json.loads((out / "result.json").read_text())
    assert _untimed(resumed) == _untimed(whole)
    assert [h["steps"] for h in resumed["history"]] == [54, 108, 162, 216]
    assert not ckpt.exists()  # removed once the result was written
