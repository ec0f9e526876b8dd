"""The d_int search: bracketing, bisection, reuse, bootstrap interval, success probability, CLI.

Most tests replace the trainer inside ``run_dims`` by a fake with a known accuracy curve per
seed, so the search runs through the real ``runs.jsonl`` bookkeeping in milliseconds and its
answer can be checked against the exact crossing of the fake's mean curve.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from subspace_jax import cli
from subspace_jax.intrinsic_dim import _sweep, bootstrap_crossings, search_intrinsic_dim
from subspace_jax.train import TrainConfig, TrainOutput

D_FAKE = 5000
BASE_ACC = 0.98


def seed_scale(seed):
    """Each seed's curve scale: lognormal around 100 (the seeds differ, as real ones do)."""
    z = np.random.default_rng(1000 + seed).standard_normal()
    return 100.0 * math.exp(0.3 * z)


def fake_acc(dim, seed):
    if dim == 0:
        return BASE_ACC + 0.002 * np.random.default_rng(seed).standard_normal()
    return 0.1 + 0.88 * (1.0 - math.exp(-dim / seed_scale(seed)))


def fake_loss(acc):
    return 1.0 - acc + 0.1


class FakeTrainer:
    """Stands in for ``train_and_evaluate``: records each call, returns the fake curves."""

    def __init__(self, best_bonus=0.0):
        self.calls = []
        self.best_bonus = best_bonus

    def __call__(self, config, data=None, *, progress=None, **kwargs):
        self.calls.append((config.dim, tuple(config.seeds)))
        accs = [fake_acc(config.dim, s) for s in config.seeds]
        losses = [fake_loss(a) for a in accs]
        return TrainOutput(self.result(config, accs, losses), None)

    def result(self, config, accs, losses):
        """The fake result dict of a run."""
        return {
            "model": config.model,
            "dataset": config.dataset,
            "projection": config.projection if config.dim else "none",
            "num_params": D_FAKE,
            "dim": config.dim,
            "val_accuracy": float(np.mean(accs)),
            "per_seed": [
                {
                    "seed": s,
                    "val_accuracy": a,
                    "best_val_accuracy": a + self.best_bonus,
                    "test_accuracy": a,
                    "test_loss": loss,
                }
                for s, a, loss in zip(config.seeds, accs, losses, strict=True)
            ],
            "history": [
                {
                    "val_loss": float(np.mean(losses)),
                    "val_accuracy": float(np.mean(accs)),
                    "per_seed_val_accuracy": accs,
                    "per_seed_train_loss": losses,
                    "per_seed_val_loss": losses,
                }
            ],
            "step_time_ms": 1.0,
            "peak_memory_bytes": 0,
            "wall_time_s": 0.01,
            "learning_rate": 0.03,
        }

    def trained(self):
        """Every (dim, seed) pair trained so far, in order."""
        return [(d, s) for d, seeds in self.calls for s in seeds]


@pytest.fixture
def fake(monkeypatch):
    trainer = FakeTrainer()
    monkeypatch.setattr(_sweep, "train_and_evaluate", trainer)
    return trainer


#: Stands for a loaded dataset: the fake trainer never reads it; its fingerprint keys the runs.
FAKE_DATA = SimpleNamespace(fingerprint="fake-data")


def config(seeds=(0, 1, 2)):
    return TrainConfig(projection="fastfood", seeds=tuple(seeds), epochs=1)


def search(out, seeds=(0, 1, 2), **kw):
    kw.setdefault("n_bootstrap", 200)
    kw.setdefault("write", False)  # id.json and id.png: only where a test reads them
    return search_intrinsic_dim(config(seeds), out, data=FAKE_DATA, **kw)


def true_crossing(seeds, target, value=fake_acc, lower=False):
    """The exact d where the mean of ``value`` over seeds meets ``target`` (bisection in d)."""

    def mean(d):
        return np.mean([value(d, s) for s in seeds])

    lo, hi = 1.0, float(D_FAKE)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        ok = mean(mid) <= target if lower else mean(mid) >= target
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi


def test_doubling_then_bisection_finds_the_crossing(tmp_path, fake):
    res = search(tmp_path, precision=0.05, d_start=64, write=True)
    path = [p["dim"] for p in res["search_path"]]
    # Doubling from 64 until the mean reaches the target, then bisection inside the bracket.
    first_ok = next(i for i, p in enumerate(res["search_path"]) if p["reached"])
    assert path[: first_ok + 1] == [64 * 2**i for i in range(first_ok + 1)]
    assert all(not p["reached"] for p in res["search_path"][:first_ok])
    lo, hi = res["bracket"]["lo"], res["bracket"]["hi"]
    assert hi / lo - 1 <= 0.05 and res["converged"]
    phases = [p["phase"] for p in res["search_path"]]
    bisect = [d for d, ph in zip(path, phases, strict=True) if ph == "bisect"]
    assert phases == sorted(phases, key=["bracket", "bisect", "ci"].index)
    assert bisect and all(path[first_ok] / 2 < d < path[first_ok] for d in bisect)
    # Points added for the interval lie outside the bracket.
    assert all(d > hi or d < lo for d, ph in zip(path, phases, strict=True) if ph == "ci")
    # The baseline is the seeds' own direct training; the target is 0.9 x its mean.
    baseline = np.mean([fake_acc(0, s) for s in (0, 1, 2)])
    assert res["baseline"]["value"] == pytest.approx(baseline)
    assert res["baseline"]["kind"] == "own"
    assert res["target"] == pytest.approx(0.9 * baseline)
    exact = true_crossing((0, 1, 2), 0.9 * baseline)
    assert lo <= res["d_int"] <= hi
    assert res["d_int"] == pytest.approx(exact, rel=0.01)
    assert res["ci_low"] <= res["d_int"] <= res["ci_high"]
    # One training per (d, seed): the baseline plus each d on the path.
    assert fake.calls == [(0, (0, 1, 2))] + [(d, (0, 1, 2)) for d in path]
    assert res["num_training_runs"]["this_invocation"] == 3 * (len(path) + 1)
    assert res["num_training_runs"]["grid_equivalent"]["runs"] == 10 * 3 + 3
    saved = json.loads((tmp_path / "id.json").read_text())
    assert saved["d_int"] == pytest.approx(res["d_int"])
    assert (tmp_path / "id.png").stat().st_size > 1000
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3 * (len(path) + 1)


def test_rerun_with_tighter_precision_trains_only_new_dims(tmp_path, fake):
    coarse = search(tmp_path, precision=0.3)
    n_coarse = len(fake.trained())
    assert coarse["num_training_runs"]["this_invocation"] == n_coarse
    fine = search(tmp_path, precision=0.02)
    new = fake.trained()[n_coarse:]
    old_dims = {p["dim"] for p in coarse["search_path"]}
    fine_dims = [p["dim"] for p in fine["search_path"]]
    assert set(fine_dims) > old_dims  # retraces the coarse path, then goes further
    assert {d for d, _ in new} == set(fine_dims) - old_dims  # only the new d values trained
    assert len(new) == len(set(new))  # each (d, seed) at most once
    assert 0 not in {d for d, _ in new}  # the baseline is reused
    assert fine["num_training_runs"]["this_invocation"] == len(new)
    assert fine["num_training_runs"]["reused"] == n_coarse
    assert fine["num_training_runs"]["total"] == n_coarse + len(new)
    hi, lo = fine["bracket"]["hi"], fine["bracket"]["lo"]
    assert hi / lo - 1 <= 0.02 or hi - lo <= 1
    # A third identical call trains nothing and gives the same answer.
    n_fine = len(fake.trained())
    again = search(tmp_path, precision=0.02)
    assert len(fake.trained()) == n_fine
    assert again["num_training_runs"]["this_invocation"] == 0
    assert again["d_int"] == fine["d_int"]


def test_halves_when_the_start_already_reaches_the_target(tmp_path, fake):
    res = search(tmp_path, d_start=2048, precision=0.1)
    path = [p["dim"] for p in res["search_path"]]
    first_fail = next(i for i, p in enumerate(res["search_path"]) if not p["reached"])
    assert path[: first_fail + 1] == [2048 // 2**i for i in range(first_fail + 1)]
    baseline = res["baseline"]["value"]
    assert res["d_int"] == pytest.approx(true_crossing((0, 1, 2), 0.9 * baseline), rel=0.01)


def test_target_reached_at_d_min_and_not_reached_by_d_max(tmp_path, fake):
    easy = search(tmp_path / "easy", baseline=0.11, d_start=4, d_min=2)
    assert easy["bracket"] == {"lo": None, "hi": 2} and not easy["converged"]
    # Reached at the first d: only a bound (censored), not a value.
    assert easy["d_int"] is None and easy["censored"] and easy["d_int_upper_bound"] == 2
    assert any("d_min" in n for n in easy["notes"])
    hard = search(tmp_path / "hard", d_max=100, write=True)
    assert hard["d_int"] is None and hard["ci_low"] is None and hard["bracket"]["hi"] is None
    assert max(p["dim"] for p in hard["search_path"]) == 100
    assert any("not reached" in n for n in hard["notes"])
    assert (tmp_path / "hard" / "id.png").exists()


def test_fixed_baseline_trains_no_direct_run(tmp_path, fake):
    res = search(tmp_path, baseline=0.5, precision=0.05)
    assert 0 not in {d for d, _ in fake.trained()}
    assert res["baseline"] == {
        "value": 0.5,
        "kind": "fixed",
        "definition": "the fixed value 0.5",
        "per_seed": None,
    }
    assert res["target"] == pytest.approx(0.45)
    assert res["d_int"] == pytest.approx(true_crossing((0, 1, 2), 0.45), rel=0.01)
    assert res["num_training_runs"]["grid_equivalent"]["runs"] == 30
    assert "fixed value 0.5" in res["definition"]


def test_success_probability_is_the_fraction_of_seeds_reaching_the_target(tmp_path, fake):
    seeds = tuple(range(8))
    res = search(tmp_path, seeds=seeds, precision=0.05)
    target = res["target"]
    by_dim = {p["dim"]: p for p in res["success_probability"]}
    assert set(by_dim) == {p["dim"] for p in res["search_path"]}
    for d, p in by_dim.items():
        hits = sum(fake_acc(d, s) >= target for s in seeds)
        assert p["seeds_reaching"] == hits and p["num_seeds"] == 8
        assert p["probability"] == pytest.approx(hits / 8)
    probs = [by_dim[d]["probability"] for d in sorted(by_dim)]
    assert probs == sorted(probs)  # the fake curves rise with d for every seed
    assert probs[0] == 0.0 and probs[-1] == 1.0


def test_bootstrap_interval_contains_d_int_and_shrinks_with_more_seeds(tmp_path, fake):
    width = {}
    for n in (3, 24):
        res = search(tmp_path / str(n), seeds=range(n), precision=0.02, n_bootstrap=500)
        assert res["ci_low"] < res["d_int"] < res["ci_high"]
        width[n] = res["ci_high"] - res["ci_low"]
    assert width[24] < 0.7 * width[3]
    one = search(tmp_path / "one", seeds=(0,), precision=0.02)
    # One seed has no spread to estimate: no interval (a single value is no 95% interval).
    assert one["d_int"] is not None and one["ci_low"] is None and one["ci_high"] is None
    assert any("one seed" in n for n in one["notes"])


def test_bootstrap_crossings_against_a_direct_resampling_loop():
    dims = [10, 20, 40, 80]
    values = np.array([[0.2, 0.3, 0.1], [0.5, 0.7, 0.4], [0.8, 0.9, 0.6], [0.95, 0.97, 0.9]])
    baseline = np.array([1.0, 0.98, 0.99])
    got = bootstrap_crossings(
        dims, values, baseline, fraction=0.9, metric="val_accuracy", n_bootstrap=50, seed=3
    )
    idx = np.random.default_rng(3).integers(0, 3, size=(50, 3))
    for b in range(50):
        mean = values[:, idx[b]].mean(axis=1)
        target = 0.9 * baseline[idx[b]].mean()
        i = next((k for k in range(4) if mean[k] >= target), None)
        if i is None:
            assert got[b] == np.inf
            continue
        t = (target - mean[i - 1]) / (mean[i] - mean[i - 1])
        expect = math.exp(math.log(dims[i - 1]) + t * math.log(dims[i] / dims[i - 1]))
        assert got[b] == pytest.approx(expect)


def test_loss_metric_reaches_when_at_or_below_baseline_over_fraction(tmp_path, fake):
    res = search(tmp_path, metric="val_loss", precision=0.05)
    runs = [r for r in res["runs"] if r["dim"] == 0]
    base_loss = np.mean([r["val_loss"] for r in runs])
    assert res["baseline"]["value"] == pytest.approx(base_loss)
    assert res["target"] == pytest.approx(base_loss / 0.9)
    # The fake's mean loss is 1.1 - mean accuracy, so the crossing is exact to compute.
    exact = true_crossing((0, 1, 2), res["target"], lambda d, s: fake_loss(fake_acc(d, s)), True)
    assert res["d_int"] == pytest.approx(exact, rel=0.01)
    assert "falls to or below the baseline / 0.9" in res["definition"]
    assert all(p["reached"] == (p["mean"] <= res["target"]) for p in res["search_path"])


def test_loss_metric_is_per_seed_and_best_epoch_is_the_lowest_loss(tmp_path, fake):
    final = search(tmp_path / "final", metric="val_loss", precision=0.05)
    best = search(tmp_path / "best", metric="val_loss", which="best", precision=0.05)
    # Each seed's own loss is recorded, so seeds differ at a given d.
    at_d = [r["val_loss"] for r in final["runs"] if r["dim"] == final["runs"][-1]["dim"]]
    assert len(set(at_d)) > 1
    # One epoch: the best epoch is the final one.
    assert best["d_int"] == pytest.approx(final["d_int"])


def test_best_epoch_uses_best_val_accuracy(tmp_path, monkeypatch):
    trainer = FakeTrainer(best_bonus=0.01)
    monkeypatch.setattr(_sweep, "train_and_evaluate", trainer)
    final = search(tmp_path / "final", precision=0.05)
    best = search(tmp_path / "best", which="best", precision=0.05)
    assert best["which"] == "best" and "best-epoch" in best["definition"]
    assert all(r["best_val_accuracy"] == r["val_accuracy"] + 0.01 for r in best["runs"])
    # Baseline and runs both gain 0.01: target +0.009, curve +0.01, so d_int drops.
    assert best["d_int"] < final["d_int"]
    exact = true_crossing((0, 1, 2), best["target"], lambda d, s: fake_acc(d, s) + 0.01)
    assert best["d_int"] == pytest.approx(exact, rel=0.01)


def test_definition_text(tmp_path, fake):
    res = search(tmp_path, fraction=0.8)
    text = res["definition"]
    assert text.startswith("d_int80: the smallest subspace dimension d")
    for part in ("mean final val accuracy", "0.8 x the baseline", "direct training", "log d"):
        assert part in text
    assert "bootstrap" in text and "Larsen" in text and res["label"] == "d_int80"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"fraction": 0.0}, "fraction must be in (0, 1]"),
        ({"fraction": 1.5}, "fraction must be in (0, 1]"),
        ({"baseline": "median"}, "baseline must be 'own' or a number"),
        ({"baseline": 1.5}, "fixed accuracy baseline must be in (0, 1]"),
        ({"baseline": -1.0}, "finite number > 0"),
        ({"metric": "accuracy"}, "metric must be one of val_accuracy, val_loss"),
        ({"which": "last"}, "which must be one of final, best"),
        ({"precision": 0.0}, "precision must be a finite number > 0"),
        ({"d_start": 0}, "d_start must be an integer >= 1"),
        ({"d_min": 8, "d_start": 4}, "d_min must be <= d_start"),
        ({"d_max": 0}, "d_max must be an integer >= 1"),
        ({"n_bootstrap": -1}, "n_bootstrap must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_rejected_before_training(tmp_path, fake, kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search(tmp_path, **kw)
    assert fake.calls == []


@pytest.mark.slow
def test_cli_id_end_to_end_on_digits(tmp_path, capsys):
    """Two real trainings (d = 32 misses 0.5 x 0.3, d = 64 reaches it): the whole pipeline."""
    out = tmp_path / "id"
    path = tmp_path / "id_result.json"
    tiny = ["--quiet", "--model", "mlp_small", "--epochs", "1", "--max-steps", "30"]
    search_args = ["--baseline", "0.3", "--fraction", "0.5", "--d-start", "32", "--d-max", "64"]
    args = ["id", *tiny, "--batch-size", "64", "--seeds", "0,1", *search_args]
    assert cli.main([*args, "--precision", "1", "--out", str(out), "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    fields = {"d_int", "ci_low", "ci_high", "fraction", "baseline", "runs", "num_training_runs"}
    assert fields <= set(res)
    assert res["fraction"] == 0.5 and res["baseline"]["value"] == 0.3
    assert res["config"]["projection"] == "fastfood" and res["seeds"] == [0, 1]
    path_dims = [p["dim"] for p in res["search_path"]]
    # The bracket [32, 64]; the search may extend once below or above for the interval.
    assert path_dims[:2] == [32, 64] and len(path_dims) <= 4
    assert 16 <= res["d_int"] <= 64
    want = {(d, s) for d in path_dims for s in (0, 1)}
    assert {(r["dim"], r["seed"]) for r in res["runs"] if r["dim"] > 0} == want
    assert res["num_training_runs"]["this_invocation"] == len(want)
    assert (out / "id.png").stat().st_size > 1000
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(want)
    assert json.loads((out / "id.json").read_text())["d_int"] == res["d_int"]
    printed = capsys.readouterr().out
    assert "d_int50 = " in printed and "95% CI [" in printed and "id.png" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baseline", "high"], "--baseline must be 'own' or a number"),
        (["--projection", "auto"], "--projection auto is not supported by id"),
        (["--fraction", "1.5"], "fraction must be in (0, 1]"),
        (["--baseline", "2"], "fixed accuracy baseline must be in (0, 1]"),
    ],
)
def test_cli_id_bad_input_is_a_short_error(tmp_path, fake, args, message, capsys):
    assert cli.main(["id", "--quiet", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert fake.calls == []
