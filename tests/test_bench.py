"""The benchmark: record contract, side-by-side ratio, skip reasons, subprocesses, the CLI."""

import json
import statistics
import subprocess
from pathlib import Path

import pytest
from _checks import load_script

from subspace_jax import bench, cli
from subspace_jax.bench import _plan as bench_plan
from subspace_jax.bench import _run as bench_run
from subspace_jax.projections import get_projection

TINY = {"model_overrides": {"width": 2}, "steps": 2, "warmup": 1, "batch_size": 8}
D_TINY = (28 * 28 + 10 + 1) * 2 + 10  # mlp_small, width 2, on 28x28x1


def check_contract(rec):
    for field in bench.CONTRACT_FIELDS:
        assert field in rec, field
    assert rec["model"] == "mlp_small" and rec["dataset"] == "digits"
    assert rec["num_params"] == D_TINY
    assert rec["batch_size"] == 8
    assert rec["backend"] == "cpu"
    assert rec["direct_step_time_ms"] > 0
    assert rec["direct_peak_memory_bytes"] > 0


def check_measured(rec):
    check_contract(rec)
    assert "skipped" not in rec
    assert rec["step_time_ms"] == pytest.approx(statistics.median(rec["step_times_ms"]))
    assert rec["direct_step_time_ms"] == pytest.approx(
        statistics.median(rec["direct_step_times_ms"])
    )
    # Side by side: the direct step is timed before and after the subspace step.
    assert len(rec["direct_step_times_ms"]) == 2 * rec["steps"]
    assert rec["ratio"] == pytest.approx(rec["step_time_ms"] / rec["direct_step_time_ms"])
    assert rec["peak_memory_bytes"] > 0
    assert rec["setup_time_s"] > 0


def test_cost_model_is_linear_in_d_for_dense():
    step_s, cell_s = bench.estimate_cell_seconds("dense", 472_610, 50_000, steps=5, warmup=2)
    assert step_s > 1 and cell_s > 7 * step_s
    small = bench.estimate_cell_seconds("dense", 472_610, 500, steps=5, warmup=2)
    assert small[0] == pytest.approx(step_s / 100)
    assert bench.estimate_cell_seconds("no_such_projection", 10, 2, steps=1, warmup=1) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dims": [0]}, "each dim"),
        ({"dims": ["half"]}, "each dim"),
        ({"projections": ["nope"]}, "unknown projection"),
        ({"isolate": "thread"}, "isolate"),
        ({"steps": 0}, "steps"),
        ({"accuracy_steps": 5, "dataset": "mnist"}, "needs real data"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_runs(kwargs, match):
    args = {"dims": [4], "projections": ["dense"], "dataset": "digits", **TINY}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bench.run_benchmark(
            "mlp_small", args.pop("dataset"), args.pop("dims"), args.pop("projections"), **args
        )


@pytest.mark.slow
def test_isolated_cells_report_their_own_peak_memory():
    recs = bench.run_benchmark("mlp_small", "digits", [4], ["dense_hash"], isolate="cell", **TINY)
    rec = recs[0]
    check_measured(rec)
    assert rec["isolation"] == "cell" and rec["memory_kind"] == "process_peak_rss"
    # Both peaks come from fresh processes that imported JAX: well above 50 MB, well below 4 GB.
    for key in ("peak_memory_bytes", "direct_peak_memory_bytes"):
        assert 50 * 2**20 < rec[key] < 4 * 2**30


@pytest.mark.slow
def test_a_process_that_dies_becomes_a_reason(tmp_path):
    spec = {
        "model": "no_such_model",
        "input_shape": [28, 28, 1],
        "seed": 0,
        "batch_size": 8,
        "warmup": 1,
        "steps": 1,
        "cells": [{"projection": "dense", "dim": 2}],
    }
    got, why = bench_run._run_isolated(spec, tmp_path, "bad", timeout_s=300)
    assert got == []
    assert why.startswith("process failed (exit 1)") and "no_such_model" in why
    got, why = bench_run._run_isolated(spec, tmp_path, "slow", timeout_s=0.01)
    assert got == [] and why == "timed out after 0s"


def test_a_killed_process_skips_its_cell_and_the_rest_run_again(monkeypatch):
    """Orchestration alone (no JAX in the fake workers): the cell a worker dies in is skipped
    with the reason, the cells after it run in a fresh worker."""
    calls = []

    def fake_run(cmd, stdout, stderr, timeout, check):
        spec = json.loads(Path(cmd[-2]).read_text())
        calls.append([c["dim"] for c in spec["cells"]])
        with open(cmd[-1], "a") as f:
            if spec.get("direct"):
                rec = {"kind": "direct", "num_params": 100, "direct_step_time_ms": 1.0,
                       "direct_peak_memory_bytes": 10, "backend": "cpu",
                       "available_memory_bytes": 10**9, "device": "cpu"}  # fmt: skip
                f.write(json.dumps(rec) + "\n")
                return subprocess.CompletedProcess(cmd, 0)
            first = spec["cells"][0]
            rec = {"kind": "cell", **first, "step_time_ms": 3.0, "direct_step_time_ms": 1.5,
                   "ratio": 2.0, "peak_memory_bytes": 20, "setup_time_s": 0.1}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
        # Dies (as if killed for memory) in its second cell.
        return subprocess.CompletedProcess(cmd, -9 if len(spec["cells"]) > 1 else 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    recs = bench.run_benchmark(
        "mlp_small", "digits", [4, 2, 3], ["dense"], isolate="projection",
        memory_budget_bytes=10**9, **TINY,
    )  # fmt: skip
    assert calls == [[], [2, 3, 4], [4]]  # dims ascending in one process, then the rest
    by = {r["dim"]: r for r in recs}
    assert [r["dim"] for r in recs] == [4, 2, 3]
    assert by[3]["skipped"] == "process killed by SIGKILL (probably out of memory)"
    assert by[3]["ratio"] is None and by[3]["direct_step_time_ms"] == 1.0
    for d in (2, 4):
        assert "skipped" not in by[d] and by[d]["ratio"] == 2.0
        assert by[d]["direct_step_time_ms"] == 1.5  # the cell's own, measured beside it
        assert by[d]["direct_peak_memory_bytes"] == 10


@pytest.mark.slow
def test_cli_records_skip_reasons_json_and_png(tmp_path, capsys, monkeypatch):
    """In-process run through the CLI: every kind of skip, the contract and the dense floor."""
    # A budget the stored dense matrix fits in at d = 8 but not at d = D.
    budget = bench.WORKING_FACTOR * get_projection("dense").state_bytes(D_TINY, 8)
    # Make the cost model call the regenerated projection hopelessly slow.
    monkeypatch.setitem(bench_plan._COST["cpu"], "regen", (1e9, 0.0, 0.0))
    names = ("dense", "dense_hash", "dense_regen", "orthogonal")
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    argv = [
        "bench", "--model", "mlp_small", "--width", "2", "--dataset", "digits",
        "--dims", "8,full,99999", "--projections", ",".join(names),
        "--dim-caps", "orthogonal=4,dense_hash=4",
        "--memory-budget-gb", repr((budget + 0.5) / 2**30),
        "--steps", "2", "--warmup", "1", "--batch-size", "8", "--isolate", "none",
        "--json", str(out), "--png", str(png),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    recs = json.loads(out.read_text())
    assert [(r["projection"], r["dim"]) for r in recs] == [
        (p, d)
        for p in names
        for d in (8, D_TINY, 99999)  # full: d = D
    ]
    by = {(r["projection"], r["dim"]): r for r in recs}
    for rec in recs:
        check_contract(rec)
        assert rec["memory_budget_bytes"] == budget
    for p in names:
        assert "out of range" in by[p, 99999]["skipped"]
        assert f"1..{D_TINY}" in by[p, 99999]["skipped"]
    assert by["dense", D_TINY]["skipped"].startswith("does not fit")
    assert by["dense", D_TINY]["step_time_ms"] is None and by["dense", D_TINY]["ratio"] is None
    assert by["dense_regen", 8]["skipped"].startswith("too slow on CPU: estimated")
    assert "s/step" in by["dense_regen", 8]["skipped"]
    assert "up to d = 4" in by["orthogonal", 8]["skipped"]
    assert "up to d = 4" in by["dense_hash", 8]["skipped"]
    assert "floor_ms" not in by["dense_hash", 8]
    check_measured(by["dense", 8])
    assert by["dense", 8]["auto_choice"] == "dense"
    assert by["dense", D_TINY]["auto_choice"] != "dense"  # it does not fit this budget
    # Stored dense: the bandwidth floor 2 D d 4 bytes / copy bandwidth, beside the step.
    rec = by["dense", 8]
    floor = 2 * D_TINY * 8 * 4 / (rec["copy_bandwidth_gbs"] * 1e9) * 1e3
    assert rec["floor_ms"] == pytest.approx(floor)
    assert png.stat().st_size > 1000
    assert (tmp_path / "bench_memory.png").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "dense d =       8: step" in err and "skipped (d = 99999 is out of range" in err
    assert err.count(" d = ") >= len(recs)  # one progress line per record


def test_cli_rejects_bad_input(capsys):
    assert cli.main(["bench", "--dims", "4,x", "--projections", "dense"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main(["bench", "--dims", "4", "--projections", "nope"]) == 2
    assert "unknown projection" in capsys.readouterr().err


def test_conv_loop_record_becomes_a_benchmarks_section_and_a_plot(tmp_path):
    """benchmarks/conv_loop.py's record, through its plot and summarize.py's section: every
    figure in the table is the record's (medians, the ratio, the mean wall time and accuracy)."""
    conv_loop = load_script("benchmarks/conv_loop.py")
    summarize = load_script("benchmarks/summarize.py")
    config = {"max_steps": 16, "batch_size": 32}
    records = [
        {"loop": "scan", "step_time_ms": 12000.0, "wall_time_s": 600.0, "test_accuracy": 0.12},
        {"loop": "host", "step_time_ms": 600.0, "wall_time_s": 100.0, "test_accuracy": 0.11},
        {"loop": "host", "step_time_ms": 700.0, "wall_time_s": 140.0, "test_accuracy": 0.11},
        {"loop": "scan", "step_time_ms": 13000.0, "wall_time_s": 700.0, "test_accuracy": 0.12},
    ]
    cases = {"resnet20_cifar10": conv_loop.summarize_case(config, records)}
    assert cases["resnet20_cifar10"]["median_step_ms"] == {"scan": 12500.0, "host": 650.0}
    path = tmp_path / "conv_loop.json"
    path.write_text(json.dumps({"host": "x86_64", "cpus": 2, "cases": cases}))
    conv_loop.plot(cases, path.with_suffix(".png"))
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = summarize._conv_loop(path, tmp_path / "BENCHMARKS.md")
    row = next(line for line in lines if line.startswith("| resnet20_cifar10"))
    assert (
        row
        == "| resnet20_cifar10 | 16 x 32 | 12,500.0 | 650.0 | 19.2x | 650 / 120 | 0.1200 / 0.1100 |"
    )
    assert "![conv loop](conv_loop.png)" in lines
    assert summarize._conv_loop(tmp_path / "absent.json", tmp_path / "B.md") == []
