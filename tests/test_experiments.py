"""The experiment configs: every invocation parses with the CLI's parser; nothing is trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _checks import load_script

from subspace_jax import cli
from subspace_jax.models import model_names
from subspace_jax.projections import projection_names

ROOT = Path(__file__).resolve().parents[1]


run = load_script("experiments/run.py")
NAMES = run.config_names()


def test_there_are_configs():
    assert {"done_criteria", "mnist_mlp_sweep"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quick", [False, True])
def test_every_invocation_parses(name, quick):
    config = run.load_config(name)
    parser = cli.build_parser()
    for entry in config["runs"]:
        args, out = run.invocation(name, entry, quick=quick)
        ns = parser.parse_args(args)
        assert ns.command == args[0]
        assert ns.model in model_names()
        assert ns.projection in projection_names()
        cli.parse_seeds(ns.seeds)
        if ns.command == "sweep":
            dims = cli.parse_dims(ns.dims)
            assert ns.out == str(out)
            if quick:
                assert len(dims) <= run.QUICK_DIMS
        elif ns.command == "id":
            assert ns.out == str(out)
            if quick:
                assert ns.d_max == int(run.QUICK_ID["--d-max"])
        else:
            assert ns.json == str(out)
        expected_root = Path("results") / ("quick" if quick else "") / name
        assert out.parent == expected_root
        assert not any(run.OUT in a for a in args)  # every {out} resolved
        for flag in ("--theta0", "--save-params"):
            if getattr(ns, flag[2:].replace("-", "_"), None):
                assert Path(getattr(ns, flag[2:].replace("-", "_"))).parent == expected_root
        if quick:
            assert ns.epochs == 1 and ns.max_steps == int(run.QUICK_SETTINGS["--max-steps"])


def test_set_flag_replaces_or_appends():
    assert run.set_flag(["train", "--epochs", "5"], "--epochs", "1") == ["train", "--epochs", "1"]
    assert run.set_flag(["train"], "--max-steps", "3") == ["train", "--max-steps", "3"]


def test_load_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        run.load_config("nope")


def test_load_config_rejects_output_flags(tmp_path, monkeypatch):
    bad = {
        "description": "x",
        "figure": "y",
        "runs": [{"name": "a", "description": "b", "args": ["train", "--json", "z"]}],
    }
    (tmp_path / "bad.json").write_text(__import__("json").dumps(bad))
    monkeypatch.setattr(run, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match="run.py adds the paths"):
        run.load_config("bad")


def test_dry_run_prints_invocations(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # main() changes to the repository root; restore it afterwards
    assert run.main(["done_criteria", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "subspace-jax train --model mlp" in err and "--json results/done_criteria/" in err


def test_summarize_replaces_only_between_markers():
    summarize = load_script("experiments/summarize.py")
    text = (
        "prose 1\n<!-- BEGIN generated:a -->\nold\n<!-- END generated:a -->\nprose 2\n"
        "<!-- BEGIN generated:b -->\n<!-- END generated:b -->\n"
    )
    new, missing = summarize.replace_sections(text, {"a": "| x |", "b": "y", "c": "z"})
    assert new == (
        "prose 1\n<!-- BEGIN generated:a -->\n| x |\n<!-- END generated:a -->\nprose 2\n"
        "<!-- BEGIN generated:b -->\ny\n<!-- END generated:b -->\n"
    )
    assert missing == ["c"]


def test_summarize_reads_an_unfinished_id_search_from_its_runs():
    summarize = load_script("experiments/summarize.py")
    runs = [
        {"dim": d, "seed": s, "val_accuracy": acc}
        for d, accs in ((0, (0.7, 0.8)), (128, (0.5, 0.6)), (512, (0.7, 0.74)))
        for s, acc in enumerate(accs)
    ]
    runs.append({"dim": 1024, "seed": 0, "val_accuracy": 0.9})  # seed 1 still training
    got = summarize.unfinished_search(runs)
    assert got["baseline"] == pytest.approx(0.75) and got["target"] == pytest.approx(0.675)
    assert got["dims"] == {128: pytest.approx(0.55), 512: pytest.approx(0.72)}
    assert got["reached"] == [512] and got["runs"] == 7 and got["bracket"] == (128, 512)
    assert "between 128 and 512" in summarize._unfinished_text(got)
    missed = summarize.unfinished_search(runs[:4])
    assert missed["reached"] == [] and "> 128" in summarize._unfinished_text(missed)
    assert summarize.unfinished_search(runs[2:]) is None  # no complete baseline


def test_summarize_gives_said_its_d_int90_from_its_grid_runs(tmp_path, monkeypatch):
    """The ResNet section's SAID runs are single trainings at the grid's d; their d_int90 row
    is the log-linear crossing of 0.9 x the direct baseline between the two grid points that
    bracket it, computed here by hand."""
    summarize = load_script("experiments/summarize.py")
    monkeypatch.setattr(summarize, "RESULTS", tmp_path)
    folder = tmp_path / "resnet20_cifar"
    folder.mkdir()

    def write(name, dim, accs):
        per_seed = [{"seed": s, "val_accuracy": a, "diverged": False} for s, a in enumerate(accs)]
        record = {
            "dim": dim,
            "num_params": 269_722,
            "val_accuracy": float(np.mean(accs)),
            "step_time_ms": 400.0,
            "wall_time_s": 100.0,
            "per_seed": per_seed,
        }
        (folder / f"{name}.json").write_text(json.dumps(record))

    write("direct", 0, [0.40, 0.38])  # baseline 0.39, target 0.351
    write("said_d1000", 1000, [0.30, 0.32])  # 0.31: misses
    write("said_d4000", 4000, [0.36, 0.38])  # 0.37: reaches
    write("said_d16000", 16000, [0.38, 0.40])
    text = summarize.section_resnet()
    expected = 1000 * 4 ** ((0.9 * 0.39 - 0.31) / (0.37 - 0.31))
    assert f"| said_d* | d_int90 | {expected:,.0f} |" in text
    assert "| fastfood_global |  | not run |" in text


def test_an_unfinished_search_reads_only_its_latest_config_and_never_scores_a_diverged_run(
    tmp_path, monkeypatch
):
    """Read from runs.jsonl as a killed search leaves it: records of an older configuration
    (the data changed) are left out, a torn last line is dropped, and a diverged run's d never
    reaches the target, whatever accuracy it recorded."""
    summarize = load_script("experiments/summarize.py")
    monkeypatch.setattr(summarize, "RESULTS", tmp_path)
    folder = tmp_path / "exp" / "arm"
    folder.mkdir(parents=True)

    def rec(key, dim, seed, acc, diverged=False):
        return {"config_key": key, "dim": dim, "seed": seed, "val_accuracy": acc,
                "diverged": diverged}  # fmt: skip

    lines = [rec("old", 0, s, 0.2) for s in (0, 1)] + [rec("old", 64, s, 0.99) for s in (0, 1)]
    lines += [rec("new", 0, s, 0.8) for s in (0, 1)]
    lines += [rec("new", 128, 0, 0.9, diverged=True), rec("new", 128, 1, 0.9)]
    lines += [rec("new", 256, s, 0.75) for s in (0, 1)]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"config_key": "new", "dim": 5'
    (folder / "runs.jsonl").write_text(text)
    got = summarize._read_unfinished("exp", "arm")
    assert got["baseline"] == pytest.approx(0.8) and 64 not in got["dims"]
    assert np.isnan(got["dims"][128])  # the diverged seed makes its d's mean NaN
    assert got["reached"] == [256] and got["bracket"] == (128, 256) and got["runs"] == 6


def test_a_ratio_whose_pretrained_interval_is_open_at_both_ends_says_so():
    summarize = load_script("experiments/summarize.py")
    scratch = {"d_int": 1000.0, "ci_low": 500.0, "ci_high": None}
    both_open = {"d_int": 100.0, "ci_low": None, "ci_high": None}
    assert summarize._ratio(both_open, scratch) == "0.100 [unbounded, unbounded]"
    assert summarize._ratio({"d_int": 100.0}, scratch) == "0.100"  # no interval computed
    bounded = {"d_int": 100.0, "ci_low": 50.0, "ci_high": 200.0}
    assert summarize._ratio(bounded, scratch) == "0.100 [unbounded, 0.400]"
