"""The statistics of d_int: non-finite runs, one definition, metric direction, censoring and a
calibrated interval (issue 15).

The cases come from an audit of ``intrinsic_dim/``; each fails on the code before the fix. The
coverage simulation runs the pure search (no training, no files) on synthetic MNIST-like
per-seed curves.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
from test_id_search import FakeTrainer, config

from subspace_jax import cli
from subspace_jax.intrinsic_dim import (
    SearchSpec,
    _search,
    _sweep,
    crossing_interval,
    interpolate_crossing,
    run_search,
    search_intrinsic_dim,
    seed_records,
    summarise,
    summarize_sweep,
)
from subspace_jax.intrinsic_dim._stats import t_quantile
from subspace_jax.train import TrainOutput

NAN = float("nan")


class BadRunTrainer(FakeTrainer):
    """The fake curves, with chosen (d, seed) runs NaN or flagged as diverged."""

    def __init__(self, nan=(), diverged=()):
        super().__init__()
        self.nan, self.diverged = set(nan), set(diverged)

    def __call__(self, config, data=None, **kw):
        res = super().__call__(config, data, **kw).result
        for i, s in enumerate(config.seeds):
            seed = res["per_seed"][i]
            if (config.dim, s) in self.nan:
                seed["val_accuracy"] = seed["best_val_accuracy"] = NAN
                for h in res["history"]:
                    for k in ("per_seed_val_loss", "per_seed_val_accuracy"):
                        h[k] = [NAN if j == i else v for j, v in enumerate(h[k])]
            if (config.dim, s) in self.diverged:
                seed["diverged"], seed["diverged_step"] = True, 17
        return TrainOutput(res, None)


@pytest.fixture
def no_data(monkeypatch):
    """Training is faked: nothing needs the dataset."""
    monkeypatch.setattr(_search, "load_checked_data", lambda base: object())
    monkeypatch.setattr(_sweep, "load_checked_data", lambda base: object())


# ------------------------------------------------------------------------------ 1. non-finite


def test_interpolate_crossing_never_interpolates_a_non_finite_point():
    # Issue case: returned nan. Now 128, the first reaching point (an upper bound).
    assert interpolate_crossing([64, 128], [NAN, 0.95], 0.9) == 128
    assert interpolate_crossing([64, 128], [None, 0.95], 0.9) == 128  # null read back
    assert interpolate_crossing([64, 128, 256], [0.5, NAN, 0.95], 0.9) == 256
    assert interpolate_crossing([64, 128], [math.inf, 0.5], 0.9) is None  # inf is no reach
    assert interpolate_crossing([64, 128], [0.8, 1.0], 0.9) == pytest.approx(64 * 2**0.5)


def test_nan_seed_in_a_loss_search_is_listed_stored_and_reused(tmp_path, monkeypatch):
    """Issue case: val_loss, one NaN seed at d = 431 gave d_int = nan in [431, 512] and the
    rerun crashed on reuse (final, and with --which best)."""
    trainer = BadRunTrainer(nan={(431, 1)})
    monkeypatch.setattr(_sweep, "train_and_evaluate", trainer)
    kw = dict(metric="val_loss", n_bootstrap=50, data=object())
    res = search_intrinsic_dim(config(), tmp_path, **kw)
    assert [p["dim"] for p in res["search_path"]][:4] == [256, 512, 362, 431]
    assert res["bracket"] == {"lo": 431, "hi": 512}
    # Never interpolated: a bound from the finite points, not nan.
    assert res["d_int"] is None and res["censored"]
    assert res["d_int_upper_bound"] == 512 and res["d_int_lower_bound"] == 362
    assert res["non_finite_runs"] == [
        {"dim": 431, "seed": 1, "diverged": False, "diverged_step": None}
    ]
    assert not next(p for p in res["search_path"] if p["dim"] == 431)["reached"]
    assert any("431" in n and "non-finite" in n for n in res["notes"])
    # Stored as JSON null, read back as non-finite; id.json is strict JSON.
    lines = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    bad = next(r for r in lines if (r["dim"], r["seed"]) == (431, 1))
    assert bad["val_loss"] is None and bad["val_loss_curve"] == [None]
    saved = json.loads((tmp_path / "id.json").read_text())
    assert saved["d_int"] is None and saved["d_int_upper_bound"] == 512
    n_trained = len(trainer.trained())
    for which in ("final", "best"):
        again = search_intrinsic_dim(config(), tmp_path, which=which, write=False, **kw)
        assert again["d_int_upper_bound"] == 512 and again["non_finite_runs"][0]["dim"] == 431
    assert len(trainer.trained()) == n_trained  # all reused
    # The same (stand-in) data: the runs' key holds the data's fingerprint.
    acc = search_intrinsic_dim(
        config(), tmp_path, which="best", n_bootstrap=0, write=False, data=object()
    )
    assert acc["num_training_runs"]["reused"] >= 9 and acc["d_int"] is not None


def test_diverged_seed_never_reaches_and_is_listed(tmp_path, monkeypatch):
    # Seed 0 at d = 1024 has a finite, reaching accuracy but diverged: a miss.
    trainer = BadRunTrainer(diverged={(1024, s) for s in (0, 1, 2)})
    monkeypatch.setattr(_sweep, "train_and_evaluate", trainer)
    res = search_intrinsic_dim(config(), tmp_path, d_start=1024, n_bootstrap=0, write=False)
    first = res["search_path"][0]
    assert first["dim"] == 1024 and not first["reached"] and math.isnan(first["mean"])
    assert {(r["dim"], r["diverged"], r["diverged_step"]) for r in res["non_finite_runs"]} == {
        (1024, True, 17)
    }
    assert any("diverged at step 17" in n for n in res["notes"])
    stored = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {r["diverged"] for r in stored if r["dim"] == 1024} == {True}


def test_seed_records_copy_divergence_and_default_to_not_diverged():
    res = FakeTrainer()(dataclasses.replace(config(seeds=(0, 1)), dim=8)).result
    res["per_seed"][1].update(diverged=True, diverged_step=40)
    recs = seed_records(res, config(seeds=(0, 1)))
    assert [(r["diverged"], r["diverged_step"]) for r in recs] == [(False, None), (True, 40)]


def test_diverged_baseline_is_an_error_in_id(tmp_path, monkeypatch, no_data, capsys):
    trainer = BadRunTrainer(diverged={(0, 1)})
    monkeypatch.setattr(_sweep, "train_and_evaluate", trainer)
    with pytest.raises(ValueError, match=r"baseline .* diverged for seed\(s\) \[1\]"):
        search_intrinsic_dim(config(), tmp_path / "api", data=object())
    code = cli.main(["id", "--quiet", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "diverged" in err and "lower the learning rate" in err
    assert {d for d, _ in trainer.trained()} == {0}  # nothing trained after the baseline


def test_nan_baseline_is_an_error_in_sweep(tmp_path, monkeypatch, no_data, capsys):
    trainer = BadRunTrainer(nan={(0, 0)})
    monkeypatch.setattr(_sweep, "train_and_evaluate", trainer)
    code = cli.main(["sweep", "--quiet", "--dims", "100,200", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "baseline" in err and "not finite" in err and "Traceback" not in err
    assert {d for d, _ in trainer.trained()} == {0}


# ------------------------------------------------------------------------------ 2. one definition


def bump_evaluate(seed_shift=(-0.004, 0.0, 0.004)):
    """Records of a rising accuracy curve (target 0.9 crossed near d = 166) with a bump at
    d = 64 that reaches the target: the mean curve is not monotone."""

    def acc(d, k):
        if d == 64:
            return 0.95 + seed_shift[k]
        return 0.5 + 0.4 * math.log(d / 4) / math.log(166 / 4) + seed_shift[k] * 10

    def evaluate(dims, seeds):
        return [
            {"dim": d, "seed": s, "num_params": 10_000, "val_accuracy": acc(d, k)}
            for d in dims
            for k, s in enumerate(seeds)
        ]

    return evaluate, acc


def test_interval_points_never_move_d_int_out_of_the_bracket(tmp_path):
    """Issue case: a bump at d = 64, bracket [152, 181], reported d_int = 63.07 with no note."""
    evaluate, acc = bump_evaluate()
    kw = dict(baseline=1.0, d_start=256, evaluate=evaluate, write=False, n_bootstrap=0)
    res = search_intrinsic_dim(config(), tmp_path, ci_extend=3, **kw)
    path = [p["dim"] for p in res["search_path"]]
    assert path[:4] == [256, 128, 181, 152] and 64 in path  # 64: added for the interval
    assert res["bracket"] == {"lo": 152, "hi": 181}
    m = {d: np.mean([acc(d, k) for k in range(3)]) - 0.9 for d in (152, 181)}
    t = -m[152] / (m[181] - m[152])
    assert res["d_int"] == pytest.approx(math.exp(math.log(152) + t * math.log(181 / 152)))
    assert res["non_monotone"] and res["non_monotone_dims"] == [64]
    assert any("not monotone" in n and "[152, 181]" in n for n in res["notes"])
    bare = search_intrinsic_dim(config(), tmp_path, ci_extend=0, **kw)
    assert bare["d_int"] == res["d_int"]  # the interval's points change only the interval


# ------------------------------------------------------------------------- 3. direction, censoring


def records(dim, values, key="val_accuracy"):
    return [{"dim": dim, "seed": s, key: v} for s, v in enumerate(values)]


def test_summarize_sweep_honours_the_loss_direction():
    """Issue case: baseline loss 0.20; losses 2.0 / 0.5 / 0.21 gave threshold 0.18, d_int 10."""
    base = records(0, [0.20], "val_loss")
    runs = [
        r for d, v in ((10, 2.0), (100, 0.5), (1000, 0.21)) for r in records(d, [v], "val_loss")
    ]
    s = summarize_sweep(base, runs, metric="val_loss")
    assert s["threshold"] == pytest.approx(0.20 / 0.9)
    t = (0.5 - 0.2 / 0.9) / (0.5 - 0.21)
    assert s["d_int"] == pytest.approx(10 ** (2 + t)) and not s["censored"]


def test_sweep_summary_flags_censored_results():
    base = records(0, [0.98, 0.98])
    first = [*records(10, [0.95, 0.96]), *records(100, [0.97, 0.97])]
    s = summarize_sweep(base, first)
    assert s["d_int"] is None and s["censored"] and s["d_int_upper_bound"] == 10
    assert any("d_int <= 10" in n for n in s["notes"])
    never = [*records(10, [0.1, 0.2]), *records(100, [0.5, 0.6])]
    s = summarize_sweep(base, never)
    assert s["d_int"] is None and s["censored"] and s["d_int_lower_bound"] == 100
    hole = [*records(10, [0.1, 0.2]), *records(100, [NAN, 0.6]), *records(1000, [0.97, 0.97])]
    s = summarize_sweep(base, hole)
    assert (s["d_int"], s["d_int_lower_bound"], s["d_int_upper_bound"]) == (None, 10, 1000)
    assert s["non_finite_runs"] == [{"dim": 100, "seed": 0, "diverged": False}]
    bump = [*records(10, [0.95, 0.95]), *records(100, [0.5, 0.5]), *records(1000, [0.97, 0.97])]
    assert summarize_sweep(base, bump)["non_monotone"]
    # The first grid point diverged: the bound (and its note) is the first finite point.
    lost = [*records(10, [NAN, NAN]), *records(100, [0.97, 0.97]), *records(1000, [0.98, 0.98])]
    s = summarize_sweep(base, lost)
    assert s["censored"] and s["d_int_upper_bound"] == 100
    assert any("d = 100 already reaches" in n and "d_int <= 100" in n for n in s["notes"])


def test_cli_sweep_reports_a_censored_bound(tmp_path, monkeypatch, no_data, capsys):
    monkeypatch.setattr(_sweep, "train_and_evaluate", FakeTrainer())
    args = ["sweep", "--quiet", "--seeds", "0,1", "--dims", "2000,4000", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert res["d_int90"] is None and res["censored"] and res["d_int_upper_bound"] == 2000
    out = capsys.readouterr().out
    assert "d_int90 <= 2,000 (censored)" in out and "note: censored" in out


def test_id_reports_a_censored_bound(tmp_path, monkeypatch, no_data, capsys):
    monkeypatch.setattr(_sweep, "train_and_evaluate", FakeTrainer())
    args = ["id", "--quiet", "--baseline", "0.11", "--d-start", "4", "--out", str(tmp_path)]
    assert cli.main([*args, "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["d_int"] is None and res["censored"] and res["d_int_upper_bound"] == 1
    assert "d_int90 <= 1 (censored)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ 4. the interval


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 10, 11, 30, 31, 200):
        assert t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-4)


def test_crossing_interval_against_the_closed_form_on_one_segment():
    """Two points, no curvature term: the ends solve m(t)^2 = c^2 s(t)^2 / n, a quadratic."""
    dims = [100, 400]
    r = np.array([[-0.03, -0.01, -0.02, -0.025], [0.02, 0.035, 0.01, 0.03]])
    m0, m1 = r.mean(axis=1)
    d_int = math.exp(math.log(100) + (-m0 / (m1 - m0)) * math.log(4))
    low, high = crossing_interval(dims, r, d_int, points=4000)
    c2 = t_quantile(0.95, 3) ** 2 / 4
    dr = r[1] - r[0]
    # m(t) = m0 + t dm; s2(t) = var(r0 + t dr): a quadratic in t.
    dm = dr.mean()
    a = dm**2 - c2 * np.var(dr, ddof=1)
    b = 2 * (m0 * dm - c2 * np.cov(r[0], dr, ddof=1)[0, 1])
    c = m0**2 - c2 * np.var(r[0], ddof=1)
    roots = sorted(np.roots([a, b, c]).real)
    expect = [math.exp(math.log(100) + t * math.log(4)) for t in roots]
    assert low == pytest.approx(expect[0], rel=1e-4) and high == pytest.approx(expect[1], rel=1e-4)
    assert low < d_int < high


# MNIST-like: accuracy vs log d a sigmoid from 0.10 to 0.965 (crossing 0.9 x 0.975 near d = 515,
# slope about 0.12 per unit of log d there), each seed shifted by a persistent offset (sd 0.005)
# plus independent noise at each d (sd 0.005): per-seed sd about 0.007 in accuracy, as in the
# MNIST MLP runs; baseline 0.975 with seed sd 0.003.
A0, A1, MU, K, BASE = 0.10, 0.965, math.log(120.0), 1.5, 0.975


def mnist_like(d):
    return A0 + (A1 - A0) / (1 + np.exp(-K * (np.log(d) - MU)))


def simulate_coverage(n_seeds, n_searches=500, seed=0):
    """Coverage of the true crossing and mean log-width of the interval over the searches."""
    rng = np.random.default_rng(seed)
    p = (0.9 * BASE - A0) / (A1 - A0)
    true = math.exp(MU + math.log(p / (1 - p)) / K)  # crossing of the expected mean curve
    hits, widths = 0, []
    for _ in range(n_searches):
        offset = 0.005 * rng.standard_normal(n_seeds)
        spec = SearchSpec(
            fraction=0.9,
            metric="val_accuracy",
            baseline=BASE + 0.003 * rng.standard_normal(n_seeds),
            d_max=159_010,
        )
        record = run_search(
            lambda d, offset=offset: mnist_like(d) + offset + 0.005 * rng.standard_normal(n_seeds),
            spec,
        )
        s = summarise(record, spec)
        low = 0.0 if s["ci_low"] is None else s["ci_low"]
        high = math.inf if s["ci_high"] is None else s["ci_high"]
        hits += low <= true <= high
        widths.append(math.log(high / low))
    return hits / n_searches, float(np.mean(widths))


@pytest.mark.parametrize(
    "n_seeds, required", [(3, 0.90), pytest.param(5, 0.93, marks=pytest.mark.slow)]
)
def test_interval_covers_the_true_crossing(n_seeds, required):
    """Measured (500 searches each): 3 seeds 95.0% coverage, mean width 0.33 in log d (about
    [0.85, 1.18] x d_int); 5 seeds 95.8%, width 0.19. The percentile bootstrap it replaces
    covered about 79% and 84% on the same curves."""
    coverage, width = simulate_coverage(n_seeds)
    print(f"{n_seeds} seeds: coverage {coverage:.3f}, mean width {width:.3f} in log d")
    assert coverage >= required
    assert width < (0.5 if n_seeds == 3 else 0.3)  # honest, not just wide


# ------------------------------------------------------------------------------ the pure steps


def test_search_steps_are_pure_functions_of_the_path():
    from subspace_jax.intrinsic_dim._search import bisect_step, bracket, bracket_step

    spec = SearchSpec(fraction=0.9, metric="val_accuracy", baseline=1.0, d_max=1000, d_start=64)
    path = []
    assert bracket_step(path, spec) == 64
    path.append({"dim": 64, "reached": False, "phase": "bracket"})
    assert bracket_step(path, spec) == 128
    path += [{"dim": d, "reached": False, "phase": "bracket"} for d in (128, 256, 512)]
    assert bracket_step(path, spec) == 1000  # capped at d_max
    path.append({"dim": 1000, "reached": True, "phase": "bracket"})
    assert bracket_step(path, spec) is None and bracket(path) == (512, 1000)
    assert bisect_step(512, 1000, 0.2) == 716 and bisect_step(600, 700, 0.2) is None
    assert bisect_step(10, 11, 0.01) is None  # hi - lo <= 1
    # Halving from a reaching start stops at the first miss, or at d_min.
    down = [{"dim": 64, "reached": True, "phase": "bracket"}]
    assert bracket_step(down, spec) == 32
    down.append({"dim": 32, "reached": False, "phase": "bracket"})
    assert bracket_step(down, spec) is None and bracket(down) == (32, 64)
    # Points added for the interval never move the bracket.
    down.append({"dim": 16, "reached": True, "phase": "ci"})
    assert bracket(down) == (32, 64)
