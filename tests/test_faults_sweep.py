"""Fault injection for ``sweep`` and ``id``: SIGKILL at random moments, then the same command.

Each trial starts the command in a subprocess and kills it with SIGKILL after a random delay;
every other trial also tears the last line of ``runs.jsonl`` at a random byte (what a kill in
the middle of an append leaves). Then the command runs again to the end. The final results must
equal those of an uninterrupted run, every line of ``runs.jsonl`` must be a whole record, and no
(config, d, seed) may be recorded twice. Two identical commands on one ``--out`` must never both
train.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

COMMON = ["--quiet", "--model", "mlp_small", "--width", "8", "--epochs", "1"]
COMMON += ["--max-steps", "5", "--batch-size", "64", "--seeds", "0"]
SWEEP = ["sweep", *COMMON, "--dims", "2,4,8", "--projection", "dense"]
ID = ["id", *COMMON, "--projection", "dense", "--d-start", "4", "--d-max", "16"]
# A fixed baseline the 5-step runs straddle (d_int80 = 13 on CPU): bracketing and bisection.
ID += ["--precision", "0.5", "--bootstrap", "0", "--baseline", "0.1", "--fraction", "0.8"]
#: Fields that measure the machine, not the result.
TIMING = {"wall_time_s", "step_time_ms", "peak_memory_bytes", "plot"}
TRIALS = 3


def command(args, out: Path) -> list[str]:
    return [sys.executable, "-m", "subspace_jax", *args, "--out", str(out)]


def run_to_end(args, out: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(command(args, out), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, time.perf_counter() - t0


def kill_after(args, out: Path, cwd: Path, delay: float) -> None:
    proc = subprocess.Popen(
        command(args, out), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def tear_last_line(path: Path, rng) -> None:
    """Cut the last record of ``path`` at a random byte, as a kill during its append would."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data:
        return
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + int(rng.integers(1, len(data) - start))])


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def check_runs_file(path: Path) -> list[dict]:
    """Every line is one whole record; no (config, d, seed) appears twice."""
    text = path.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    keys = [(r["config_key"], r["dim"], r["seed"]) for r in records]
    assert len(keys) == len(set(keys)), keys
    return records


def results_of(name: str, out: Path) -> dict:
    result = strip_timing(json.loads((out / f"{name}.json").read_text()))
    if name == "id":
        result.pop("num_training_runs")  # how many runs this invocation trained differs
    return result


@pytest.mark.parametrize("args, name", [(SWEEP, "sweep"), (ID, "id")], ids=["sweep", "id"])
def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_result(tmp_path, args, name):
    rng = np.random.default_rng(8)
    reference = tmp_path / "reference"
    _, wall = run_to_end(args, reference, tmp_path)
    expected = results_of(name, reference)
    expected_records = check_runs_file(reference / "runs.jsonl")
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        kill_after(args, out, tmp_path, float(rng.uniform(0.3, 1.0)) * wall)
        if trial % 2 == 0:
            tear_last_line(out / "runs.jsonl", rng)
        proc, _ = run_to_end(args, out, tmp_path)
        assert "Traceback" not in proc.stderr
        assert results_of(name, out) == expected, f"trial {trial}"
        records = check_runs_file(out / "runs.jsonl")
        assert sorted(strip_timing(records), key=lambda r: r["dim"]) == sorted(
            strip_timing(expected_records), key=lambda r: r["dim"]
        )


def test_two_identical_sweeps_on_one_out_never_train_a_run_twice(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        command(SWEEP, out), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    lock = out / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.read_text().strip() == str(first.pid)
    # Without --wait: one error line naming the holder, at once, nothing written.
    second = subprocess.run(
        command(SWEEP, out), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    if first.poll() is None:  # (the first may rarely finish before the second asks)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"process {first.pid}" in errors[0]
    # With --wait: waits for the first, then reuses everything it trained.
    third = subprocess.run(
        command([*SWEEP, "--wait"], out), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert first.wait(timeout=600) == 0
    assert third.returncode == 0, third.stderr[-2000:]
    records = check_runs_file(out / "runs.jsonl")
    assert sorted(r["dim"] for r in records) == [0, 2, 4, 8]
    assert os.path.getsize(out / "sweep.json") > 0
