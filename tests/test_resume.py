"""Resumable training: a run interrupted anywhere resumes from its latest orbax checkpoint and
ends with exactly the numbers of an uninterrupted run."""

import dataclasses
import json
import os
import shutil
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

needs_orbax = pytest.mark.skipif(not _resume.available(), reason="orbax-checkpoint missing")

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


@needs_orbax
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


def _wait_for_epoch_2_checkpoint(proc: subprocess.Popen, out: Path) -> list[str]:
    """Read ``proc``'s stderr to its line for epoch 2, then wait for that epoch's checkpoint
    (step 108) under ``out/checkpoints``; the lines read."""
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
    return lines


@needs_orbax
@pytest.mark.slow
def test_train_killed_after_its_second_epoch_resumes_only_the_remaining_steps(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run([*TRAIN, "--out", str(ref), "--quiet"], check=True, env=_env())
    whole = json.loads((ref / "result.json").read_text())

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*TRAIN, "--out", str(out)], env=_env(), stderr=subprocess.PIPE, text=True
    )
    lines = _wait_for_epoch_2_checkpoint(proc, out)
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


@needs_orbax
def test_a_checkpoint_round_trips_the_loop_state_with_empty_leaves_and_dtypes(tmp_path):
    """Direct training has an empty ``w`` (orbax refuses empty arrays); dtypes must survive
    (a float32 loss restored as float64 would change the epoch means)."""
    import jax.numpy as jnp
    import numpy as np

    from subspace_jax.train._epochs import first_state

    n = 2
    rng = np.random.default_rng(0)
    t = {"w": jnp.zeros((n, 0)), "direct": (jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),)}
    o = ({"count": jnp.array([4, 4], jnp.int32), "mu": {"w": jnp.zeros((n, 0))}},)
    d = {"at": jnp.array([0, 3], jnp.int32)}
    fresh = first_state(t, o, d, n)
    losses = rng.normal(size=(5, n)).astype(np.float32)
    record = {
        "epoch": 1, "steps": 7, "epoch_time_s": 0.5,
        "train_loss": losses.mean(0), "train_accuracy": losses.mean(0),
        "val_loss": np.float32([0.5, 0.25]), "val_accuracy": np.float32([0.75, 0.5]),
        "diverged_at": np.int32([0, 3]),
    }  # fmt: skip
    state = fresh._replace(
        trainables={**t, "direct": (t["direct"][0] + 1,)},
        step=12, epoch=1, epoch_step=5, losses=losses, accs=losses * 2,
        best_val=np.array([0.75, 0.5]), epochs=[record], step_times=[0.1, 0.2],
    )  # fmt: skip
    saver = _resume.GroupCheckpointer(tmp_path / "g", CheckpointOptions(tmp_path), "k", 7)
    saver(state, epoch_ended=False)  # no trigger: no epoch end, no step or time interval
    saver.close()
    assert not (tmp_path / "g").exists()
    saver.save(state)
    saver.close()
    back = _resume.GroupCheckpointer(tmp_path / "g", CheckpointOptions(tmp_path), "k", 7)
    got = back.restore(fresh)
    assert (got.step, got.epoch, got.epoch_step, got.step_times) == (12, 1, 5, [0.1, 0.2])
    np.testing.assert_array_equal(got.trainables["direct"][0], state.trainables["direct"][0])
    assert got.trainables["w"].shape == (n, 0) and got.opt_states[0]["count"].dtype == jnp.int32
    assert got.losses.dtype == np.float32 and np.array_equal(got.losses, losses)
    for k in ("train_loss", "val_loss", "val_accuracy", "diverged_at"):
        assert got.epochs[0][k].dtype == record[k].dtype
        np.testing.assert_array_equal(got.epochs[0][k], record[k])
    assert got.epochs[0]["steps"] == 7 and got.best_val.dtype == np.float64
    # A checkpoint of another run (another key) is not resumed.
    other = _resume.GroupCheckpointer(tmp_path / "g", CheckpointOptions(tmp_path), "x", 7)
    assert other.restore(fresh) is fresh


@pytest.mark.slow
def test_without_orbax_checkpointing_is_off_with_a_note(tmp_path, monkeypatch, capsys):
    from subspace_jax import cli

    monkeypatch.setattr(_resume, "available", lambda: False)
    tiny = ["--quiet", "--epochs", "1", "--max-steps", "3", "--model", "mlp_small", "--width", "8"]
    out = tmp_path / "o"
    args = ["train", *tiny, "--out", str(out), "--checkpoint-every-steps", "1"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "note: checkpointing is off: orbax-checkpoint is not installed" in err
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]
    # Not asked for: off without a word.
    assert cli.main(["train", *tiny, "--out", str(tmp_path / "p")]) == 0
    assert "checkpointing" not in capsys.readouterr().err
    # The library says so with a warning and trains.
    config = TrainConfig(model="mlp_small", epochs=1, max_steps=2)
    with pytest.warns(UserWarning, match="checkpointing is off"):
        train_and_evaluate(config, checkpoint=CheckpointOptions(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


@needs_orbax
@pytest.mark.slow
def test_a_batchnorm_run_with_augmentation_resumes_to_the_uninterrupted_numbers(tmp_path):
    """The checkpoint holds the BatchNorm statistics beside the trainable, and the
    augmentation inside the scan follows the global step: a resumed run ends as a whole one."""
    import jax
    import numpy as np

    from subspace_jax.train import split_state

    data = load_data(TrainConfig(val_size=32))
    data = data._replace(
        x_train=data.x_train[:32], y_train=data.y_train[:32],
        x_test=data.x_test[:32], y_test=data.y_test[:32], fingerprint=None,
    )  # fmt: skip
    config = TrainConfig(
        model="resnet20", dim=20, projection="dense", epochs=2, batch_size=8, val_size=32,
        augment=True, model_overrides={"blocks": 1, "widths": [2, 4, 4]},
    )  # fmt: skip
    # The whole run checkpoints at each epoch end (4 steps an epoch, one chunk each); dropping
    # its last checkpoint leaves the state of a run killed during epoch 2.
    options = CheckpointOptions(tmp_path / "ckpt")
    whole, trained = train_and_evaluate(config, data, checkpoint=options)
    folder = _resume.run_directory(options, config, data) / "group-0"
    assert sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) == [4, 8]
    shutil.rmtree(folder / "8")
    events = []
    resumed, again = train_and_evaluate(config, data, progress=events.append, checkpoint=options)
    assert any("from the checkpoint at step 4 " in e.get("text", "") for e in events)
    assert [e["step"] for e in events if e["event"] == "step"] == [8]
    assert _untimed(resumed) == _untimed(whole)
    (_, state), (_, state_again) = split_state(trained.trainables), split_state(again.trainables)
    leaves, leaves_again = jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state_again)
    for a, b in zip(leaves, leaves_again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_leaves(state)  # the statistics were there to compare


RESUME_ON_A_MESH = """
import dataclasses, json, sys
import jax
from subspace_jax import sharding
from subspace_jax.train import CheckpointOptions, TrainConfig, load_data, train_and_evaluate

assert jax.device_count() == 4


class Stop(Exception):
    pass


def stop_after(step):
    def progress(event):
        if event["event"] == "step" and event["step"] >= step:
            raise Stop

    return progress


config = TrainConfig(
    model="mlp_small", epochs=2, batch_size=64, seeds=(0, 1, 2, 3), dim=30, projection="fastfood"
)
data = load_data(config)
plan = sharding.local_plan()
whole = train_and_evaluate(config, data, mesh=plan).result
options = CheckpointOptions(sys.argv[1], every_steps=20)
try:
    train_and_evaluate(config, data, progress=stop_after(40), checkpoint=options, mesh=plan)
except Stop:
    pass
events = []
resumed = train_and_evaluate(
    config, data, progress=events.append, checkpoint=options, mesh=plan
).result
texts = [e["text"] for e in events if e["event"] == "message"]
print(json.dumps({"whole": whole, "resumed": resumed, "messages": texts}))
"""


@needs_orbax
@pytest.mark.slow
def test_a_run_sharded_over_four_devices_resumes_to_the_uninterrupted_numbers(tmp_path):
    """Seeds spread over 4 forced host devices: the checkpoint holds the sharded state, the
    resumed run places it back on the mesh and ends with the uninterrupted run's numbers."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run(
        [sys.executable, "-c", RESUME_ON_A_MESH, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["whole"]["mesh"] == {"seeds": 4, "data": 1, "params": 1}
    assert any("from the checkpoint at step 32" in t for t in out["messages"]), out["messages"]
    assert _untimed(out["resumed"]) == _untimed(out["whole"])


def _two_processes(args, out: Path, log: Path) -> list[subprocess.Popen]:
    """``train args --out out`` on 2 processes x 2 forced CPU devices over 127.0.0.1 (gloo);
    process 0's stderr piped, process 1's into ``log``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for pid in range(2):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        cmd = [*args, "--out", str(out), *flags, "--process-id", str(pid)]
        err = subprocess.PIPE if pid == 0 else log.open("w")
        procs.append(subprocess.Popen(cmd, env=env, stderr=err, text=True))
    return procs


@needs_orbax
@pytest.mark.slow
def test_two_processes_killed_after_the_second_epoch_resume_together(tmp_path):
    """orbax's multi-host mode: both processes checkpoint into process 0's folder, are
    SIGKILLed after epoch 2, and the rerun of both resumes from that shared checkpoint (only
    the remaining epochs train) to the uninterrupted two-process run's exact numbers."""
    ref = tmp_path / "ref"
    procs = _two_processes(TRAIN, ref, tmp_path / "ref1.log")
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, (err or (tmp_path / "ref1.log").read_text())[-3000:]
    whole = json.loads((ref / "result.json").read_text())
    assert whole["processes"] == 2 and whole["devices"] == 4
    assert not (ref / "checkpoints").exists()

    out = tmp_path / "run"
    procs = _two_processes(TRAIN, out, tmp_path / "run1.log")
    lines = _wait_for_epoch_2_checkpoint(procs[0], out)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
        assert p.returncode == -signal.SIGKILL, "".join(lines)
    assert not (out / "result.json").exists()
    # Complete checkpoints only: orbax writes into "<step>.orbax-checkpoint-tmp-..." first.
    found = (out / "checkpoints").glob("*/group-0/*")
    steps = sorted(int(p.name) for p in found if p.name.isdigit())
    assert 108 in steps and max(steps) < 216, steps  # one shared folder, process 0's

    procs = _two_processes(TRAIN, out, tmp_path / "rerun1.log")
    _, err = procs[0].communicate(timeout=600)
    procs[1].wait(timeout=600)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, err[-3000:]
    start = max(steps)
    for text in (err, (tmp_path / "rerun1.log").read_text()):
        assert f"from the checkpoint at step {start} of 216" in text, text[-3000:]
    epochs = [ln.split()[1] for ln in err.splitlines() if ln.strip().startswith("epoch")]
    assert epochs == [str(e) for e in range(start // 54 + 1, 5)]  # only the remaining epochs
    resumed = json.loads((out / "result.json").read_text())
    assert _untimed(resumed) == _untimed(whole)
    assert not (out / "checkpoints").exists()  # removed by process 0 once both were done
