"""Live logs and progress: TensorBoard events read back with TensorBoard's own reader, W&B
offline runs read back from their files, and the three progress modes (terminal, plain, quiet).

The logs are consumers of the training loop's progress events, so most checks feed them
events directly; the end-to-end ones (marked slow) train and compare with the result JSON.
"""

import importlib.util
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from subspace_jax import _logs, cli
from subspace_jax._progress import CountBar, ProgressPrinter, format_duration

TINY = ["--model", "mlp_small", "--width", "8", "--batch-size", "256", "--val-size", "200"]


# ------------------------------------------------------------------------------ helpers


class Clock:
    """A fake monotonic clock: ``tick(dt)`` advances it."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def tick(self, dt):
        self.t += dt


class TTY(io.StringIO):
    def isatty(self):
        return True


def tb_scalars(folder):
    """``{tag: [(step, value)]}`` of one run folder, read by TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def f32(values):
    """TensorBoard keeps scalars as float32."""
    return [float(np.float32(v)) for v in values]


class FakeBackend:
    """Records what each named run received."""

    def __init__(self):
        self.runs = {}
        self.meta = {}
        self.closed = []

    def open(self, name, meta):
        backend = self
        self.runs[name] = []
        self.meta[name] = dict(meta)

        class Handle:
            def write(self, step, scalars):
                backend.runs[name].append((step, dict(scalars)))

            def flush(self):
                pass

            def close(self):
                backend.closed.append(name)

        return Handle()

    def series(self, name, tag):
        return [(s, v[tag]) for s, v in self.runs[name] if tag in v]


def epoch_event(epoch, steps, seeds, lr=0.1, **per_seed):
    """An epoch event as the loop sends it, with per-seed values given by name."""
    n = len(seeds)
    vals = {k: list(v) for k, v in per_seed.items()}
    vals.setdefault("per_seed_val_accuracy", [0.5] * n)
    vals.setdefault("per_seed_val_loss", [1.0] * n)
    vals.setdefault("per_seed_train_loss", [1.5] * n)
    return {
        "event": "epoch",
        "epoch": epoch,
        "steps": steps,
        "seeds": list(seeds),
        "learning_rate": lr,
        "train_loss": float(np.mean(vals["per_seed_train_loss"])),
        "train_accuracy": 0.4,
        "val_loss": float(np.mean(vals["per_seed_val_loss"])),
        "val_accuracy": float(np.mean(vals["per_seed_val_accuracy"])),
        "per_seed_diverged": [False] * n,
        "epoch_time_s": 2.0,
        **vals,
    }


# ------------------------------------------------------------------------------ --log parsing


def test_parse_log_specs_repeated_and_comma_separated():
    specs = _logs.parse_log_specs(["tensorboard:/tmp/tb", "wandb"])
    assert specs == [_logs.LogSpec("tensorboard", "/tmp/tb"), _logs.LogSpec("wandb", None)]
    assert _logs.parse_log_specs(["wandb:proj, tensorboard"]) == [
        _logs.LogSpec("wandb", "proj"),
        _logs.LogSpec("tensorboard", None),
    ]
    assert _logs.parse_log_specs(None) == []


@pytest.mark.parametrize(
    "value, message",
    [
        ("mlflow", "unknown log 'mlflow'"),
        ("tensorboard:", "nothing after ':'"),
        ("tensorboard,tensorboard:x", "given twice"),
    ],
)
def test_parse_log_specs_rejects(value, message):
    with pytest.raises(ValueError, match=message):
        _logs.parse_log_specs([value])


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_missing_package_is_one_error_line_before_training(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(_logs._MODULE, kind, "no_such_module_for_subspace_jax_tests")
    out = tmp_path / "out"
    code = cli.main(["train", *TINY, "--out", str(out), "--log", kind])
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"pip install 'subspace-jax[{kind}]'" in lines[0]
    assert not out.exists()  # nothing trained, nothing written


def test_unknown_log_is_an_error(tmp_path, capsys):
    code = cli.main(["sweep", "--dims", "10", "--out", str(tmp_path), "--log", "mlflow"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --log 'mlflow': unknown log")


# ------------------------------------------------------------------------------ RunLogs


def test_runlogs_names_steps_timing_and_retries():
    clock = Clock()
    fake = FakeBackend()
    logs = _logs.RunLogs([fake], memory=lambda: 3 * 2**20, clock=clock)
    logs({"event": "run_start", "dim": 30, "seeds": [0, 1]})
    # Steps in chunks of 5 (per-chunk events): 10 ms per step after the first (compiling) event.
    for step in (5, 10, 15, 20):
        logs({"event": "step", "step": step, "total_steps": 40, "epoch": 0})
        clock.tick(0.05)
    logs(epoch_event(1, 20, [0, 1], per_seed_val_accuracy=[0.25, 0.75]))
    for step in (25, 30, 35, 40):
        clock.tick(0.1)  # 20 ms per step in epoch 2
        logs({"event": "step", "step": step, "total_steps": 40, "epoch": 1})
    logs(epoch_event(2, 40, [0, 1], per_seed_val_accuracy=[0.5, float("nan")]))
    # Seed 1 is retried: its steps start over, at a tenth of the learning rate.
    logs({"event": "message", "text": "retrying seeds [1] from scratch with learning rate 0.01 "
          "(retry 1 of 2)"})  # fmt: skip
    logs({"event": "step", "step": 5, "total_steps": 40, "epoch": 0})
    logs(epoch_event(1, 20, [1], lr=0.01, per_seed_val_accuracy=[0.6]))
    per_seed = [
        {"seed": 0, "test_accuracy": 0.7, "test_loss": 0.9, "retries": 0},
        {"seed": 1, "test_accuracy": 0.8, "test_loss": 0.8, "retries": 1},
    ]
    end = {"event": "run_end", "dim": 30, "steps": 40, "val_accuracy": 0.5, "wall_time_s": 1}
    logs({**end, "test_accuracy": 0.7, "test_loss": 0.9, "per_seed": per_seed})
    logs.close()

    assert set(fake.runs) == {"d=30/mean", "d=30/seed=0", "d=30/seed=1", "d=30/seed=1/retry=1"}
    assert sorted(fake.closed) == sorted(fake.runs)
    assert fake.meta["d=30/seed=1"] == {"dim": 30, "seed": 1}
    assert fake.series("d=30/seed=0", "val/accuracy") == [(20, 0.25), (40, 0.5)]
    assert fake.series("d=30/seed=1", "val/accuracy")[0] == (20, 0.75)
    assert np.isnan(fake.series("d=30/seed=1", "val/accuracy")[1][1])
    assert fake.series("d=30/seed=1/retry=1", "val/accuracy") == [(20, 0.6)]
    assert fake.series("d=30/seed=1/retry=1", "train/learning_rate") == [(20, 0.01)]
    assert fake.series("d=30/seed=0", "train/learning_rate") == [(20, 0.1), (40, 0.1)]
    # The retry's means (over seed 1 only) are not the run's: the mean has two epochs.
    assert [s for s, _ in fake.series("d=30/mean", "val/accuracy")] == [20, 40]
    assert fake.series("d=30/mean", "run/dim") == [(0, 30), (20, 30), (40, 30)]
    step_ms = fake.series("d=30/mean", "perf/step_time_ms")
    assert [s for s, _ in step_ms] == [20, 40]
    np.testing.assert_allclose([v for _, v in step_ms], [10.0, 20.0])
    assert fake.series("d=30/mean", "perf/peak_memory_mib") == [(20, 3.0), (40, 3.0)]
    assert fake.series("d=30/seed=1/retry=1", "test/accuracy") == [(40, 0.8)]
    assert fake.series("d=30/seed=0", "test/loss") == [(40, 0.9)]
    assert fake.series("d=30/mean", "test/accuracy") == [(40, 0.7)]


def test_runlogs_without_run_start_names_seeds_from_the_event():
    fake = FakeBackend()
    with _logs.RunLogs([fake], memory=lambda: 0) as logs:
        logs(epoch_event(1, 10, [4, 7]))
    assert set(fake.runs) == {"seed=4", "seed=7", "mean"}


def test_tensorboard_backend_reads_back_with_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    logs = _logs.RunLogs([_logs.TensorBoardBackend(tmp_path)], memory=lambda: 2**20)
    logs({"event": "run_start", "dim": 12, "seeds": [3]})
    logs(epoch_event(1, 7, [3], per_seed_val_accuracy=[0.123456789]))
    logs(epoch_event(2, 14, [3], per_seed_val_accuracy=[0.5]))
    logs.close()
    assert sorted(p.name for p in (tmp_path / "d=12").iterdir()) == ["mean", "seed=3"]
    seed = tb_scalars(tmp_path / "d=12" / "seed=3")
    assert seed["val/accuracy"] == list(zip([7, 14], f32([0.123456789, 0.5]), strict=True))
    assert seed["train/learning_rate"] == [(7, f32([0.1])[0]), (14, f32([0.1])[0])]
    mean = tb_scalars(tmp_path / "d=12" / "mean")
    assert mean["run/dim"] == [(0, 12.0), (7, 12.0), (14, 12.0)]


# ------------------------------------------------------------------------------ progress


def _feed_run(printer, clock, total=100, chunk=10, dt=0.5):
    for step in range(chunk, total + 1, chunk):
        printer({"event": "step", "step": step, "total_steps": total, "epoch": 0})
        clock.tick(dt)


def test_progress_on_a_terminal_draws_a_bar_with_rate_and_eta():
    clock = Clock()
    stream = TTY()
    printer = ProgressPrinter(stream, clock=clock)
    for step in (10, 20, 30):  # 10 steps per 0.5 s after the first event: 20 steps/s
        printer({"event": "step", "step": step, "total_steps": 100, "epoch": 0})
        clock.tick(0.5)
    out = stream.getvalue()
    assert out.startswith("\r\033[K") and "\n" not in out
    last = out.split("\r\033[K")[-1]
    # 70 steps left at 20 steps/s: 3.5 s.
    assert "[#######" in last and "30/100 steps" in last
    assert "20.0 steps/s" in last and "ETA 0:04" in last and "epoch 1" in last
    printer(epoch_event(1, 30, [0]))
    assert stream.getvalue().endswith(
        "\r\033[K  epoch   1  train loss 1.5000  val acc 0.5000  (1.5s)\n"
    )


def test_progress_plain_stream_prints_lines_only_every_few_seconds():
    clock = Clock()
    stream = io.StringIO()
    printer = ProgressPrinter(stream, clock=clock, every_s=2.0)
    _feed_run(printer, clock)  # 10 events, 0.5 s apart: a step line every 2 s
    printer(epoch_event(1, 100, [0]))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    steps = [x for x in lines if x.startswith("  step ")]
    assert steps and len(steps) <= 3
    assert steps[0].startswith("  step 50/100 (50%), 20.0 steps/s, ETA 0:02")
    assert lines[-1].startswith("  epoch   1")


def test_progress_quiet_prints_nothing():
    clock = Clock()
    for stream in (TTY(), io.StringIO()):
        printer = ProgressPrinter(stream, quiet=True, clock=clock)
        _feed_run(printer, clock)
        printer(epoch_event(1, 100, [0]))
        printer({"event": "run_start", "dim": 3, "seeds": [0]})
        printer({"event": "message", "text": "hello"})
        printer.close()
        assert stream.getvalue() == ""


def test_progress_counts_runs_of_a_sweep_and_reused_runs():
    clock = Clock()
    stream = io.StringIO()
    printer = ProgressPrinter(stream, total_runs=3, clock=clock)
    printer({"event": "run_reused", "dim": 0, "seeds": [0]})
    printer({"event": "run_start", "dim": 10, "seeds": [0]})
    clock.tick(10)
    printer({"event": "run_end", "dim": 10, "val_accuracy": 0.5, "wall_time_s": 10.0})
    printer({"event": "run_start", "dim": 20, "seeds": [0]})
    clock.tick(4)
    printer({"event": "step", "step": 10, "total_steps": 100, "epoch": 0})
    clock.tick(1)
    printer({"event": "step", "step": 20, "total_steps": 100, "epoch": 0})
    lines = stream.getvalue().splitlines()
    # Nothing trained yet: no ETA; the reused run took no time.
    assert lines[0] == "d = 0 seeds [0]: reused from runs.jsonl  [run 1/3, sweep ETA ?]"
    assert lines[1] == "d = 10 seeds [0]  [run 2/3, sweep ETA ?]"
    # One run trained in 10 s, one left.
    assert lines[3] == "d = 20 seeds [0]  [run 3/3, sweep ETA 0:10]"
    # Then the current run's own ETA (10 steps/s, 80 steps left; the last run).
    bar = printer.bar_text({"step": 20, "total_steps": 100})
    assert bar.endswith("10.0 steps/s  ETA 0:08 | run 3/3, sweep ETA 0:08")


def test_count_bar_on_terminal_only():
    clock = Clock()
    tty, plain = TTY(), io.StringIO()
    bars = [CountBar(4, "cells", s, clock=clock) for s in (tty, plain)]
    for _ in range(2):
        clock.tick(3.0)
        for b in bars:
            b.advance()
    assert plain.getvalue() == ""
    assert tty.getvalue().endswith("2/4 cells  3.0 s/cell  ETA 0:06")


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 75, 3725, None, float("inf"))] == [
        "0:00",
        "1:00",
        "1:15",
        "1:02:05",
        "?",
        "?",
    ]


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_train_logs_equal_the_result_history(tmp_path, capsys, monkeypatch):
    # TensorBoard, and W&B offline when installed (the test extra installs both): one training.
    pytest.importorskip("tensorboard")
    with_wandb = importlib.util.find_spec("wandb") is not None
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    out = tmp_path / "run"
    args = ["train", *TINY, "--dim", "20", "--seeds", "0,1", "--epochs", "2", "--quiet"]
    logs = ["--log", "tensorboard"] + (["--log", "wandb:subspace-test"] if with_wandb else [])
    assert cli.main([*args, "--out", str(out), *logs]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no progress at all
    res = json.loads((out / "result.json").read_text())
    if with_wandb:
        check_wandb_train_runs(out, res)
    root = out / "tensorboard" / "d=20"
    assert sorted(p.name for p in root.iterdir()) == ["mean", "seed=0", "seed=1"]
    steps = [h["steps"] for h in res["history"]]
    mean = tb_scalars(root / "mean")
    for tag, key in [
        ("val/accuracy", "val_accuracy"),
        ("val/loss", "val_loss"),
        ("train/loss", "train_loss"),
        ("train/accuracy", "train_accuracy"),
    ]:
        want = list(zip(steps, f32(h[key] for h in res["history"]), strict=True))
        assert mean[tag] == want, tag
    assert mean["test/accuracy"] == [(res["steps"], f32([res["test_accuracy"]])[0])]
    assert mean["run/dim"][0] == (0, 20.0)
    # A rate needs two step events: an epoch of one chunk (the first, here) logs none.
    timed = {s for s, _ in mean["perf/step_time_ms"]}
    assert timed <= set(steps) and steps[-1] in timed
    assert all(v > 0 for _, v in mean["perf/step_time_ms"] + mean["perf/peak_memory_mib"])
    for i, rec in enumerate(res["per_seed"]):
        seed = tb_scalars(root / f"seed={rec['seed']}")
        for tag, key in [
            ("val/accuracy", "per_seed_val_accuracy"),
            ("val/loss", "per_seed_val_loss"),
            ("train/loss", "per_seed_train_loss"),
        ]:
            want = list(zip(steps, f32(h[key][i] for h in res["history"]), strict=True))
            assert seed[tag] == want, (tag, i)
        assert [v for _, v in seed["train/learning_rate"]] == f32([rec["learning_rate"]] * 2)
        assert seed["test/accuracy"] == [(res["steps"], f32([rec["test_accuracy"]])[0])]
        assert len(seed["train/accuracy"]) == 2


@pytest.mark.slow
def test_sweep_logs_one_run_per_d_and_seed(tmp_path):
    pytest.importorskip("tensorboard")
    out, tb = tmp_path / "sweep", tmp_path / "tb"
    args = ["sweep", *TINY, "--quiet", "--dims", "10", "--seeds", "0,1", "--epochs", "2"]
    assert cli.main([*args, "--out", str(out), "--log", f"tensorboard:{tb}"]) == 0
    assert sorted(str(p.relative_to(tb)) for p in tb.glob("d=*/*")) == [
        "d=0/mean",
        "d=0/seed=0",
        "d=0/seed=1",
        "d=10/mean",
        "d=10/seed=0",
        "d=10/seed=1",
    ]
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    for rec in runs:
        got = tb_scalars(tb / f"d={rec['dim']}" / f"seed={rec['seed']}")
        assert [v for _, v in got["val/accuracy"]] == f32(rec["val_curve"])
        assert [v for _, v in got["train/loss"]] == f32(rec["train_loss_curve"])
        assert got["test/accuracy"][-1][1] == f32([rec["test_accuracy"]])[0]


def wandb_records(run_file):
    """The protobuf records of an offline W&B run file (W&B's leveldb-style log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf + chunk)
            buf = b""
            yield rec
        elif kind in (2, 3):  # FIRST, MIDDLE
            buf += chunk


def wandb_runs(folder):
    """``{run name: [history rows]}`` of the offline W&B runs in ``folder/wandb``, and each
    run's ``(project, group)``."""
    runs, where = {}, {}
    for f in Path(folder, "wandb").glob("offline-run-*/run-*.wandb"):
        name, history = None, []
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                name = rec.run.display_name
                where[name] = (rec.run.project, rec.run.run_group)
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in rec.history.item})  # fmt: skip
        runs[name] = history
    return runs, where


@pytest.mark.slow
def test_wandb_backend_offline_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    backend = _logs.WandbBackend("proj", "grp", tmp_path, "sweep", {"model": "mlp"})
    with _logs.RunLogs([backend], memory=lambda: 2**21) as logs:
        logs({"event": "run_start", "dim": 5, "seeds": [2]})
        logs(epoch_event(1, 3, [2], per_seed_val_accuracy=[0.125]))
        logs(epoch_event(2, 6, [2], per_seed_val_accuracy=[0.25]))
        end = {"event": "run_end", "dim": 5, "val_accuracy": 0.25, "wall_time_s": 1.0}
        per_seed = [{"seed": 2, "test_accuracy": 0.5, "test_loss": 1.0, "retries": 0}]
        logs({**end, "steps": 6, "test_accuracy": 0.5, "test_loss": 1.0, "per_seed": per_seed})
    runs, where = wandb_runs(tmp_path)
    assert where == {"d=5/mean": ("proj", "grp"), "d=5/seed=2": ("proj", "grp")}
    seed = runs["d=5/seed=2"]
    assert [(h["_step"], h["val/accuracy"]) for h in seed if "val/accuracy" in h] == [
        (3, 0.125),
        (6, 0.25),
    ]
    assert [h["test/accuracy"] for h in seed if "test/accuracy" in h] == [0.5]
    assert [h["perf/peak_memory_mib"] for h in runs["d=5/mean"] if "perf/peak_memory_mib" in h] == [
        2.0,
        2.0,
    ]


def check_wandb_train_runs(out, res):
    """The offline W&B runs of ``train --dim 20 --seeds 0,1`` hold the result's history."""
    steps = [h["steps"] for h in res["history"]]
    runs, where = wandb_runs(out)
    assert {p for p, _ in where.values()} == {"subspace-test"}
    assert len({g for _, g in where.values()}) == 1
    assert next(iter(where.values()))[1].startswith("train-mlp_small-digits-dense-")
    assert set(runs) == {"d=20/mean", "d=20/seed=0", "d=20/seed=1"}
    mean = [h for h in runs["d=20/mean"] if "val/accuracy" in h]
    assert [h["_step"] for h in mean] == steps
    assert [h["val/accuracy"] for h in mean] == [h["val_accuracy"] for h in res["history"]]
    for i, rec in enumerate(res["per_seed"]):
        got = [h for h in runs[f"d=20/seed={rec['seed']}"] if "val/loss" in h]
        assert [h["val/loss"] for h in got] == [h["per_seed_val_loss"][i] for h in res["history"]]
        tested = [
            h["test/accuracy"] for h in runs[f"d=20/seed={rec['seed']}"] if "test/accuracy" in h
        ]
        assert tested == [rec["test_accuracy"]]
