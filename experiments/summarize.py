"""Turn the measured results under ``results/`` into ``docs/results/*.png`` and RESULTS.md tables.

Every number in the generated sections of RESULTS.md comes from the result JSON written by
``experiments/run.py``; the reference numbers (seed report, Li et al. 2018) are the constants
below. The tables replace the text between ``<!-- BEGIN generated:NAME -->`` and
``<!-- END generated:NAME -->`` markers of RESULTS.md; the prose around them is kept. A result
that is missing (an experiment not run, or not finished) is reported as such.

Usage (from the repository root)::

    python experiments/summarize.py            # write the PNGs and update RESULTS.md
    python experiments/summarize.py --print    # print the generated sections only
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import run as runner  # noqa: E402  (experiments/run.py: config loading and invocations)

from subspace_jax import results  # noqa: E402
from subspace_jax.intrinsic_dim import RUNS_FILE, describe_estimate, summarize_sweep  # noqa: E402
from subspace_jax.intrinsic_dim._stats import metric_value, reaches, target_value  # noqa: E402

RESULTS = ROOT / "results"
FIGURES = ROOT / "docs" / "results"
RESULTS_MD = ROOT / "RESULTS.md"

#: Reference numbers: the seed report and Li et al. 2018 (ICLR), "Measuring the Intrinsic
#: Dimension of Objective Landscapes" (d_int90 of their Table 1). Li et al.'s baseline
#: accuracies are not quoted here (None): only numbers given in the project brief are used.
REFERENCE = {
    "mnist_mlp": {
        "seed_baseline": 0.9763,
        "seed_dint90": "~750",
        "li_baseline": None,
        "li_dint90": "750",
    },
    "mnist_lenet": {
        "seed_baseline": 0.9888,
        "seed_dint90": "~200",
        "li_baseline": None,
        "li_dint90": "~290",
    },
    "cifar_mlp": {
        "seed_baseline": None,
        "seed_dint90": "~4,500",
        "li_baseline": None,
        "li_dint90": "9,000",
    },
    "cifar_lenet": {
        "seed_baseline": 0.6141,
        "seed_dint90": "0.5829 at d~6k",
        "li_baseline": None,
        "li_dint90": "~2,900",
    },
}

SWEEPS = [
    # (key, experiment, run, title)
    ("mnist_mlp", "mnist_mlp_sweep", "sparse", "MNIST MLP 784-200-10"),
    ("mnist_lenet", "mnist_lenet_sweep", "sparse", "MNIST LeNet (28x28)"),
    ("cifar_mlp", "cifar_sweeps", "mlp_fastfood", "CIFAR-10 MLP (28x28x3)"),
    ("cifar_lenet", "cifar_sweeps", "lenet_fastfood", "CIFAR-10 LeNet (32x32x3)"),
]


# ------------------------------------------------------------------------------ reading


def read_train(experiment: str, run: str) -> dict | None:
    path = RESULTS / experiment / f"{run}.json"
    return results.read_json(path) if path.exists() else None


def _last_config_runs(experiment: str, run: str) -> list[dict]:
    """The records of a run folder's ``runs.jsonl`` written under its latest configuration
    (a torn last line, an interrupted append, is dropped by :func:`results.read_jsonl`)."""
    records = results.read_jsonl(RESULTS / experiment / run / RUNS_FILE)
    key = records[-1]["config_key"] if records else None
    return [r for r in records if r["config_key"] == key]


def read_sweep(experiment: str, run: str) -> tuple[list[dict], list[dict]] | None:
    """(baseline records, subspace records) of the sweep run last in that folder."""
    summary = RESULTS / experiment / run / "sweep.json"
    if summary.exists():  # what the last sweep used (its baseline may come from an older key)
        data = results.read_json(summary)
        return list(data["baseline"]["runs"]), list(data["runs"])
    records = _last_config_runs(experiment, run)
    if not records:
        return None
    base = [r for r in records if int(r["dim"]) == 0]
    sub = [r for r in records if int(r["dim"]) > 0]
    return base, sub


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def commands(experiment: str, only: str | None = None) -> str:
    """The exact commands of one experiment (as run.py runs them), or of its run ``only``."""
    config = runner.load_config(experiment)
    if only is None:
        lines = [f"python experiments/run.py {experiment}   # runs:"]
    else:
        lines = [f"python experiments/run.py {experiment} --only {only}   # runs:"]
    for entry in config["runs"]:
        if only is not None and entry["name"] != only:
            continue
        args, _ = runner.invocation(experiment, entry)
        lines.append("subspace-jax " + " ".join(args))
    return "```\n" + "\n".join(lines) + "\n```"


def lr_span(records: list[dict]) -> str:
    """The resolved learning rate(s) of some runs: one value, or 'a to b (by d)'."""
    lrs = sorted({round(float(r["learning_rate"]), 6) for r in records})
    if not lrs:
        return "n/a"
    if len(lrs) == 1:
        return f"{lrs[0]:.4g}"
    return f"{lrs[-1]:.4g} to {lrs[0]:.4g} (falling with d above d = 1,000)"


def hyper_line(cfg: dict, lr: float, extra: str = "") -> str:
    return (
        f"optimizer {cfg['optimizer']}, lr {lr:.4g} (resolved), batch {cfg['batch_size']}, "
        f"epochs {cfg['epochs']}"
        + (f", max steps {cfg['max_steps']}" if cfg.get("max_steps") else "")
        + f", seeds {cfg['seeds']}, data seed {cfg['data_seed']}, l2 {cfg['l2']}"
        + (f", {extra}" if extra else "")
    )


# ------------------------------------------------------------------------------ sections


def section_hardware() -> str:
    import jax

    from subspace_jax.bench import cpu_model_name

    model = cpu_model_name() or "unknown"

    return table(
        ["", ""],
        [
            ["CPU (`lscpu` model name)", model],
            ["cores", os.cpu_count()],
            ["backend", jax.default_backend()],
            ["jax", jax.__version__],
            ["python", platform.python_version()],
        ],
    )


def section_done() -> str:
    rows = []
    for run, criterion in (("mlp_mnist_dense_d750", 0.85), ("mlp_mnist_direct", 0.97)):
        r = read_train("done_criteria", run)
        if r is None:
            rows.append([run, "not run", "", "", f">= {criterion}", "", "", "", ""])
            continue
        rows.append(
            [
                f"d = {r['dim']} ({r['projection']})" if r["dim"] else "direct (d = 0)",
                fmt(r["val_accuracy"]),
                fmt(r["best_val_accuracy"]),
                fmt(r["test_accuracy"]),
                f">= {criterion}",
                "**pass**" if r["val_accuracy"] >= criterion else "**FAIL**",
                f"{r['learning_rate']:.4g}",
                f"{r['step_time_ms']:.1f}",
                f"{r['wall_time_s']:.0f}",
            ]
        )
    out = table(
        [
            "run",
            "val acc (final)",
            "val acc (best epoch)",
            "test acc",
            "criterion",
            "",
            "lr",
            "step ms",
            "wall s",
        ],
        rows,
    )
    r = read_train("done_criteria", "mlp_mnist_dense_d750")
    if r is not None:
        out += "\n\nPer epoch (dense d = 750): " + ", ".join(
            f"{h['epoch']}: {h['val_accuracy']:.4f}" for h in r["history"]
        )
        out += "\n\nHyperparameters: " + hyper_line(r["config"], r["learning_rate"])
        direct = read_train("done_criteria", "mlp_mnist_direct")
        if direct is not None:
            ratio = r["val_accuracy"] / direct["val_accuracy"]
            out += (
                f"\n\nThe dense d = 750 run reaches {ratio:.3f}"
                " of the direct run's val accuracy (0.9 is the d_int90 threshold)."
            )
    return out + "\n\n" + commands("done_criteria")


def _sweep_figure(key: str, experiment: str, run: str, title: str, base, sub) -> str | None:
    if not sub:
        return None
    summ = summarize_sweep(base, sub) if base else None
    path = FIGURES / f"{experiment}_{run}.png"
    cfg_proj = sub[0]["projection"]
    results.plot_accuracy_vs_dim(
        path,
        sub,
        baseline=summ["baseline_accuracy"] if summ else None,
        d_int=summ["d_int"] if summ else None,
        title=f"{title}, {cfg_proj} P, {sub[0]['epochs']} epochs, "
        f"{len({r['seed'] for r in sub})} seed(s)",
    )
    return path.relative_to(ROOT).as_posix()


def section_sweep(key: str, experiment: str, run: str, title: str) -> str:
    data = read_sweep(experiment, run)
    ref = REFERENCE[key]
    if data is None:
        return f"Not run (no `results/{experiment}/{run}/{RUNS_FILE}`).\n\n" + commands(
            experiment, run
        )
    base, sub = data
    dims = sorted({int(r["dim"]) for r in sub})
    seeds = sorted({int(r["seed"]) for r in sub + base})
    summ = summarize_sweep(base, sub) if base and sub else None
    rows = []
    baseline = summ["baseline_accuracy"] if summ else None
    for d in dims:
        rs = sorted((r for r in sub if int(r["dim"]) == d), key=lambda r: r["seed"])
        mean = float(np.mean([r["val_accuracy"] for r in rs]))
        rows.append(
            [
                f"{d:,}",
                fmt(mean),
                " / ".join(fmt(r["val_accuracy"]) for r in rs),
                fmt(mean / baseline, 3) if baseline else "n/a",
                f"{rs[0]['step_time_ms']:.1f}",
                f"{rs[0]['wall_time_s']:.0f}",
            ]
        )
    out = table(
        ["d", "val acc (mean)", "per seed", "/ baseline", "step ms", "wall s"],
        rows,
    )
    base_acc = fmt(baseline) if base else "not run"
    out += "\n\n" + table(
        ["", "this run", "seed report", "Li et al. 2018"],
        [
            ["D", f"{(base or sub)[0]['num_params']:,}", "", ""],
            [
                "direct baseline (val acc)",
                base_acc,
                fmt(ref["seed_baseline"]),
                fmt(ref["li_baseline"]) if ref["li_baseline"] else "not quoted",
            ],
            [
                "d_int90",
                describe_estimate(summ) if summ else "n/a",
                ref["seed_dint90"],
                ref["li_dint90"],
            ],
        ],
    )
    figure = _sweep_figure(key, experiment, run, title, base, sub)
    if figure:
        out += f"\n\n![{title}]({figure})"
    rec = (base or sub)[0]
    lr_base = base[0]["learning_rate"] if base else None
    wall_per_dim = {int(r["dim"]): r["wall_time_s"] for r in base + sub}  # seeds share a run
    out += (
        f"\n\nHyperparameters: Adam, batch 128, {rec['epochs']} epoch(s), seeds {seeds} "
        f"(vmapped), projection `{sub[0]['projection'] if sub else 'n/a'}`, "
        f"lr {lr_span(sub)} in the subspace and {fmt(lr_base, 4)} direct (resolved defaults); "
        f"total wall time {sum(wall_per_dim.values()) / 60:.1f} min."
    )
    missing = []
    config = runner.load_config(experiment)
    for entry in config["runs"]:
        if entry["name"] == run:
            want = [int(x) for x in runner.get_flag(entry["args"], "--dims").split(",")]
            missing = [d for d in want if d not in dims]
    if missing:
        out += f" Not finished: d = {', '.join(map(str, missing))}."
    return out + "\n\n" + commands(experiment, run)


def _plot_orth(path: Path, runs: dict) -> None:
    """Train loss and val accuracy per epoch: colour per projection, line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    colours = {"dense": "tab:blue", "orthogonal": "tab:red"}
    labels = {"dense": "Gaussian (dense)", "orthogonal": "orthogonal (QR)"}
    for ax, per, ylabel in (
        (axes[0], "per_seed_train_loss", "train loss (epoch mean)"),
        (axes[1], "per_seed_val_accuracy", "val accuracy"),
    ):
        for p, r in runs.items():
            epochs = [h["epoch"] for h in r["history"]]
            for i, seed in enumerate(r["seeds"]):
                ax.plot(
                    epochs,
                    [h[per][i] for h in r["history"]],
                    color=colours[p],
                    ls=["-", "--", ":", "-."][i % 4],
                    marker="o",
                    ms=3,
                    label=f"{labels[p]}, seed {seed}",
                )
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("MNIST MLP, d = 200: orthogonal vs Gaussian projection", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def section_orth() -> str:
    runs = {p: read_train("orth_vs_gauss", f"{p}_d200") for p in ("dense", "orthogonal")}
    if not all(runs.values()):
        return "Not finished.\n\n" + commands("orth_vs_gauss")
    rows = []
    n_epochs = len(runs["dense"]["history"])
    for e in range(n_epochs):
        hd, ho = runs["dense"]["history"][e], runs["orthogonal"]["history"][e]
        rows.append(
            [
                e + 1,
                fmt(hd["train_loss"]),
                fmt(ho["train_loss"]),
                fmt(hd["val_accuracy"]),
                fmt(ho["val_accuracy"]),
                " / ".join(fmt(a) for a in hd["per_seed_val_accuracy"]),
                " / ".join(fmt(a) for a in ho["per_seed_val_accuracy"]),
            ]
        )
    out = table(
        [
            "epoch",
            "train loss Gaussian",
            "train loss orthogonal",
            "val acc Gaussian",
            "val acc orthogonal",
            "per seed Gaussian",
            "per seed orthogonal",
        ],
        rows,
    )
    out += "\n\n" + table(
        ["projection", "test acc", "lr", "step ms", "setup s", "wall s"],
        [
            [
                p,
                fmt(r["test_accuracy"]),
                f"{r['learning_rate']:.4g}",
                f"{r['step_time_ms']:.1f}",
                f"{r['setup_time_s']:.1f}",
                f"{r['wall_time_s']:.0f}",
            ]
            for p, r in runs.items()
        ],
    )
    path = FIGURES / "orth_vs_gauss.png"
    _plot_orth(path, runs)
    out += f"\n\n![orthogonal vs Gaussian]({path.relative_to(ROOT).as_posix()})"
    r = runs["dense"]
    out += "\n\nHyperparameters: " + hyper_line(r["config"], r["learning_rate"])
    return out + "\n\n" + commands("orth_vs_gauss")


def section_small() -> str:
    config = runner.load_config("small_models")
    direct = {}
    for entry in config["runs"]:
        if entry["args"][0] == "train":
            r = read_train("small_models", entry["name"])
            if r is not None:
                direct[r["num_params"]] = r
    data = read_sweep("small_models", "subspace_mlp_fastfood")
    sub = {int(r["dim"]): r for r in data[1]} if data is not None else {}
    # An earlier, interrupted run with the very sparse projection (its step grew too slow).
    partial = read_sweep("small_models", "subspace_mlp")
    sub_sparse = {int(r["dim"]): r for r in partial[1]} if partial is not None else {}
    sizes = sorted(set(direct) | set(sub))
    if not sizes:
        return "Not run.\n\n" + commands("small_models")
    rows = []
    for n in sizes:
        d, s = direct.get(n), sub.get(n)
        rows.append(
            [
                f"{n:,}",
                f"width {d['config']['model_overrides'].get('width')}" if d else "",
                fmt(d["val_accuracy"]) if d else "not run",
                fmt(s["val_accuracy"]) if s else "not run",
                fmt(sub_sparse[n]["val_accuracy"]) if n in sub_sparse else "not run",
            ]
        )
    out = table(
        [
            "parameters",
            "small MLP",
            "small MLP direct (val acc)",
            "MLP in Fastfood subspace, d = params",
            "MLP in very sparse subspace (interrupted run)",
        ],
        rows,
    )
    extra = [
        ["CIFAR-10 mlp_small width 10 (2 epochs)", read_train("cifar_sweeps", "mlp_small_w10")]
    ]
    for label, r in extra:
        if r is not None:
            out += (
                f"\n\n{label}: {r['num_params']:,} parameters, val acc "
                f"{fmt(r['val_accuracy'])} (seed report: 23.5k parameters -> 0.395)."
            )
    if data is not None and data[0]:
        acc = fmt(data[0][0]["val_accuracy"])
        out += f"\n\nDirect MNIST MLP (D = 159,010) in the same run: {acc}."
    series = {}
    if direct:
        ns = sorted(direct)
        series["small MLP, trained directly"] = (ns, [direct[n]["val_accuracy"] for n in ns])
    if sub:
        ns = sorted(sub)
        series["784-200-10 MLP in a Fastfood subspace of d = params"] = (
            ns,
            [sub[n]["val_accuracy"] for n in ns],
        )
    if sub_sparse:
        ns = sorted(sub_sparse)
        series["784-200-10 MLP in a very sparse subspace (interrupted)"] = (
            ns,
            [sub_sparse[n]["val_accuracy"] for n in ns],
        )
    path = FIGURES / "small_models.png"
    results.plot_lines(
        path,
        series,
        xlabel="trainable parameters",
        ylabel="val accuracy",
        title="MNIST: small direct models vs subspace training (3 epochs, seed 0)",
        logx=True,
    )
    out += f"\n\n![small models vs subspace]({path.relative_to(ROOT).as_posix()})"
    any_r = next(iter(direct.values()), None)
    if any_r is not None:
        out += "\n\nHyperparameters (direct): " + hyper_line(
            any_r["config"], any_r["learning_rate"]
        )
    if sub:
        s = next(iter(sub.values()))
        out += (
            f"; subspace: projection `{s['projection']}`, lr {lr_span(list(sub.values()))}, "
            f"{s['epochs']} epochs, seed 0"
        )
    return out + "\n\n" + commands("small_models")


def section_projections() -> str:
    config = runner.load_config("cifar_projections")
    rows = []
    missing = []
    first = None
    for entry in config["runs"]:
        r = read_train("cifar_projections", entry["name"])
        if r is None:
            missing.append(entry["name"])
            continue
        first = first or r
        rows.append(
            [
                f"`{entry['name']}`",
                fmt(r["val_accuracy"]),
                fmt(r["test_accuracy"]),
                r["steps"],
                f"{r['learning_rate']:.4g}",
                f"{r['step_time_ms']:.1f}",
                mib(r["peak_memory_bytes"]),
                f"{r['setup_time_s']:.1f}",
                f"{r['wall_time_s']:.0f}",
            ]
        )
    if not rows:
        return "Not run.\n\n" + commands("cifar_projections")
    out = table(
        [
            "projection",
            "val acc",
            "test acc",
            "steps",
            "lr",
            "step ms (median)",
            "peak RSS MiB",
            "setup s",
            "wall s",
        ],
        rows,
    )
    if missing:
        out += f"\n\nNot run: {', '.join(missing)}."
    out += "\n\nHyperparameters: " + hyper_line(first["config"], first["learning_rate"])
    return out + "\n\n" + commands("cifar_projections")


def section_summary() -> str:
    """Headline numbers of every experiment, and the total measured wall time."""
    rows = []
    for run, criterion in (("mlp_mnist_dense_d750", 0.85), ("mlp_mnist_direct", 0.97)):
        r = read_train("done_criteria", run)
        what = "done criterion: " + ("dense d = 750" if "dense" in run else "direct")
        if r is None:
            rows.append([what, f"not run (criterion >= {criterion})", "", ""])
        else:
            ok = "pass" if r["val_accuracy"] >= criterion else "FAIL"
            rows.append([what, f"{fmt(r['val_accuracy'])} (>= {criterion}: {ok})", "", ""])
    for key, experiment, run, title in SWEEPS:
        data = read_sweep(experiment, run)
        ref = REFERENCE[key]
        if data is None or not data[0] or not data[1]:
            rows.append([f"{title}: d_int90", "not run", ref["seed_dint90"], ref["li_dint90"]])
            continue
        summ = summarize_sweep(*data)
        value = describe_estimate(summ)
        epochs = data[1][0]["epochs"]
        rows.append(
            [
                f"{title}: d_int90 ({epochs} epoch(s), {data[1][0]['projection']})",
                value,
                ref["seed_dint90"],
                ref["li_dint90"],
            ]
        )
    wall = 0.0
    # Only the experiments' own folders (results/ may also hold ad-hoc runs).
    experiments = {p.stem for p in (Path(__file__).parent / "configs").glob("*.json")}
    for path in RESULTS.glob("*/*.json"):
        if path.parent.name in experiments:
            wall += results.read_json(path).get("wall_time_s", 0.0)
    for path in RESULTS.glob(f"*/*/{RUNS_FILE}"):
        if path.parent.parent.name in experiments:
            wall += sum(r["wall_time_s"] for r in _dedupe(path))
    out = table(["", "this run", "seed report", "Li et al. 2018"], rows)
    note = f"Total wall time of the experiment runs under `results/`: {wall / 60:.0f} min."
    return out + "\n\n" + note


def _dedupe(path: Path) -> list[dict]:
    """One record per (config, d) of a runs.jsonl file: vmapped seeds share one run."""
    seen = {}
    for r in results.read_jsonl(path):
        seen[(r["config_key"], int(r["dim"]))] = r
    return list(seen.values())


def _read_id(experiment: str, run: str) -> dict | None:
    path = RESULTS / experiment / run / "id.json"
    return results.read_json(path) if path.exists() else None


def unfinished_search(runs: list[dict], fraction: float = 0.9) -> dict | None:
    """What the finished runs of an ``id`` search stopped before its ``id.json`` say.

    ``runs``: the records of its ``runs.jsonl`` (of one configuration). Only the dims every
    seed finished count; a diverged or non-finite run makes its d's mean NaN, which never
    reaches the target (as in ``id``). Returns None without a complete baseline (d = 0), else
    ``{"baseline", "target", "dims": {d: mean val accuracy}, "reached": [d whose mean reaches
    the target], "bracket", "runs"}``.
    """
    metric = "val_accuracy"
    seeds = {r["seed"] for r in runs}
    by_dim: dict[int, dict[int, float]] = {}
    for r in runs:
        by_dim.setdefault(int(r["dim"]), {})[r["seed"]] = metric_value(r, metric, "final")
    means = {d: float(np.mean(list(v.values()))) for d, v in by_dim.items() if len(v) == len(seeds)}
    if 0 not in means:
        return None
    baseline = means.pop(0)
    target = target_value(baseline, fraction, metric)
    reached = sorted(d for d, m in means.items() if reaches(m, target, metric))
    below = [d for d in means if reached and d < reached[0]]
    return {
        "baseline": baseline,
        "target": target,
        "dims": dict(sorted(means.items())),
        "reached": reached,
        # d_int90 lies in (lo, hi]: the largest d missing below the first d reaching
        "bracket": (max(below) if below else None, reached[0]) if reached else None,
        "runs": len(runs),
    }


def _read_unfinished(experiment: str, run: str) -> dict | None:
    runs = _last_config_runs(experiment, run)
    return unfinished_search(runs) if runs else None


def _unfinished_text(u: dict) -> str:
    if u["reached"]:
        lo, hi = u["bracket"]
        if lo is None:
            return f"search unfinished: <= {hi:,} (every d tried reaches the target)"
        return f"search unfinished: between {lo:,} and {hi:,} (missed at {lo:,}, reached at {hi:,})"
    top = max(u["dims"])
    best = max(u["dims"].values())
    return (
        f"search unfinished: > {top:,} (target {u['target']:.3f} not reached by any d tried; "
        f"best mean {best:.3f})"
    )


def _dint_text(r: dict | None) -> str:
    if r is None:
        return "not run"
    text = describe_estimate(r)
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if "ci_low" in r:  # an open end: beyond the range the search evaluated
        lo_text = "unbounded" if lo is None else f"{lo:,.0f}"
        hi_text = "unbounded" if hi is None else f"{hi:,.0f}"
        text += f" [{lo_text}, {hi_text}]"
    return text


def _ratio(pre: dict | None, scratch: dict | None) -> str:
    """Ratio of the point estimates, with the interval of the two 95% intervals' ends
    (``lo_pre / hi_scratch``, ``hi_pre / lo_scratch``): conservative, not a 95% interval."""
    if not pre or not scratch or pre.get("d_int") is None or scratch.get("d_int") is None:
        return "n/a"
    text = f"{pre['d_int'] / scratch['d_int']:.3f}"
    if "ci_low" not in pre:  # no interval computed (both ends None is one open at both ends)
        return text
    lo_pre, hi_pre = pre.get("ci_low"), pre.get("ci_high")
    lo_scratch, hi_scratch = scratch.get("ci_low"), scratch.get("ci_high")
    # An unbounded end of either interval leaves that end of the ratio unbounded.
    low = lo_pre / hi_scratch if lo_pre and hi_scratch else None
    high = hi_pre / lo_scratch if hi_pre and lo_scratch else None
    low_text = "unbounded" if low is None else f"{low:.3f}"
    high_text = "unbounded" if high is None else f"{high:.3f}"
    return text + f" [{low_text}, {high_text}]"


def section_finetune(experiment: str = "finetune_cifar") -> str:
    """Pretrained vs random theta0: d_int90 on CIFAR-10 classes 5-9, and their ratio."""
    config = runner.load_config(experiment)
    models = []
    for entry in config["runs"]:
        if entry["name"].endswith("_id_scratch"):
            models.append(entry["name"][: -len("_id_scratch")])
    rows, points = [], {}
    for model in models:
        names = {"random": f"{model}_id_scratch"}
        names.update({label: f"{model}_id_pre_{label}" for label in ("short", "long")})
        ids = {label: _read_id(experiment, name) for label, name in names.items()}
        # A search stopped before its id.json is reported from its finished runs.
        opens = {
            label: None if ids[label] else _read_unfinished(experiment, name)
            for label, name in names.items()
        }
        scratch, scratch_open = ids["random"], opens["random"]
        for label, r in ids.items():
            pre = None if label == "random" else read_train(experiment, f"{model}_pre_{label}")
            epochs = (
                "0" if label == "random" else (str(pre["config"]["epochs"]) if pre else "not run")
            )
            pre_acc = fmt(pre["val_accuracy"]) if pre else ("" if label == "random" else "n/a")
            baseline = fmt(r["baseline"]["value"]) if r else "n/a"
            runs = r["num_training_runs"]["total"] if r else ""
            d_text = _dint_text(r)
            unfinished = opens[label]
            if unfinished is not None:
                baseline, d_text, runs = (
                    fmt(unfinished["baseline"]),
                    _unfinished_text(unfinished),
                    unfinished["runs"],
                )
            ratio = "1" if label == "random" else _ratio(r, scratch)
            if r and r.get("d_int") and scratch_open:  # against the unfinished scratch search
                if not scratch_open["reached"]:
                    ratio = f"< {r['d_int'] / max(scratch_open['dims']):.3f}"
                elif scratch_open["bracket"][0] is not None:
                    lo, hi = scratch_open["bracket"]
                    ratio = f"{r['d_int'] / hi:.3f} to {r['d_int'] / lo:.3f}"
            rows.append(
                [
                    model,
                    "random init" if label == "random" else f"pretrained ({label})",
                    epochs,
                    pre_acc,
                    baseline,
                    d_text,
                    ratio,
                    runs,
                ]
            )
            if r and r.get("d_int") is not None and epochs.isdigit():
                points.setdefault(model, []).append(
                    (int(epochs), r["d_int"], r.get("ci_low"), r.get("ci_high"))
                )
    out = table(
        [
            "model",
            "theta0",
            "pretraining epochs (classes 0-4)",
            "pretrain val acc",
            "direct baseline, classes 5-9 (val acc)",
            "d_int90 [95% t-interval]",
            "ratio to random [ends of intervals]",
            "training runs",
        ],
        rows,
    )
    if points:
        figure = _plot_finetune(FIGURES / f"{experiment}.png", points)
        out += f"\n\n![d_int90 vs pretraining]({figure})"
    return out + "\n\n" + commands(experiment)


def _plot_finetune(path: Path, points: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for model, pts in sorted(points.items()):
        pts = sorted(pts)
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        lo = [p[1] - p[2] if p[2] is not None else 0 for p in pts]
        hi = [p[3] - p[1] if p[3] is not None else 0 for p in pts]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=model)
    ax.set_yscale("log")
    ax.set_xlabel("pretraining epochs on classes 0-4 (0 = random theta0)")
    ax.set_ylabel("d_int90 on classes 5-9")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return os.path.relpath(path, ROOT)


def section_resnet(experiment: str = "resnet20_cifar") -> str:
    """ResNet-20 on CIFAR-10: direct baseline, then val accuracy vs d per subspace kind."""
    config = runner.load_config(experiment)
    direct = read_train(experiment, "direct")
    rows, said = [], []
    for entry in config["runs"]:
        name = entry["name"]
        if entry["args"][0] == "sweep":
            data = read_sweep(experiment, name)
            if data is None:
                rows.append([name, "", "not run", "", ""])
                continue
            base, sub = data
            summ = summarize_sweep(base, sub) if base and sub else None
            for d in sorted({int(r["dim"]) for r in sub}):
                accs = [r["val_accuracy"] for r in sub if int(r["dim"]) == d]
                rows.append([name, f"{d:,}", fmt(float(np.mean(accs))), "", ""])
            rows.append([name, "d_int90", describe_estimate(summ) if summ else "n/a", "", ""])
        elif name.startswith("said_"):
            r = read_train(experiment, name)
            if r is None:
                rows.append([name, "", "not run", "", ""])
            else:
                rows.append(
                    [name, f"{r['dim']:,}", fmt(r["val_accuracy"]), f"{r['step_time_ms']:.0f}", ""]
                )
                said += [{**rec, "dim": r["dim"]} for rec in r["per_seed"]]
    if said and direct is not None:
        # The SAID runs are single trainings at the grid's d: their d_int90 is the sweeps'
        # estimate over those points, against the direct run's per-seed baseline.
        base = [{**rec, "dim": 0} for rec in direct["per_seed"]]
        rows.append(["said_d*", "d_int90", describe_estimate(summarize_sweep(base, said)), "", ""])
    head = (
        "not run"
        if direct is None
        else (
            f"{fmt(direct['val_accuracy'])} (D = {direct['num_params']:,}, "
            f"{direct['wall_time_s']:.0f} s)"
        )
    )
    out = f"Direct baseline (val acc): {head}\n\n"
    out += table(["run", "d", "val acc (mean over seeds)", "step ms", ""], rows)
    return out + "\n\n" + commands(experiment)


SECTIONS = {
    "summary": section_summary,
    "hardware": section_hardware,
    "done_criteria": section_done,
    **{
        f"sweep_{key}": (lambda k=key, e=exp, r=run, t=title: section_sweep(k, e, r, t))
        for key, exp, run, title in SWEEPS
    },
    "orth_vs_gauss": section_orth,
    "small_models": section_small,
    "cifar_projections": section_projections,
    "finetune_cifar": section_finetune,
    "resnet20_cifar": section_resnet,
}


def replace_sections(text: str, sections: dict[str, str]) -> tuple[str, list[str]]:
    """Replace the body between each ``BEGIN/END generated:NAME`` marker pair."""
    missing = []
    for name, body in sections.items():
        tag = re.escape(name)
        pattern = re.compile(
            rf"(<!-- BEGIN generated:{tag} -->\n).*?(<!-- END generated:{tag} -->)", re.S
        )
        if not pattern.search(text):
            missing.append(name)
            continue
        text = pattern.sub(lambda m, b=body: m.group(1) + b.rstrip() + "\n" + m.group(2), text)
    return text, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="print the sections only")
    parser.add_argument("--results", default=None, help="read another results folder")
    opts = parser.parse_args(argv)
    if opts.results:
        global RESULTS, FIGURES
        RESULTS = Path(opts.results).resolve()
        FIGURES = RESULTS / "figures"  # keep docs/results for the real results
    FIGURES.mkdir(parents=True, exist_ok=True)
    sections = {name: fn() for name, fn in SECTIONS.items()}
    if opts.print:
        for name, body in sections.items():
            print(f"## {name}\n\n{body}\n")
        return 0
    text = RESULTS_MD.read_text()
    text, missing = replace_sections(text, sections)
    RESULTS_MD.write_text(text)
    if missing:
        print(f"RESULTS.md has no markers for: {', '.join(missing)}", file=sys.stderr)
    sizes = Counter()
    for png in FIGURES.glob("*.png"):
        sizes[png.name] = png.stat().st_size
        if png.stat().st_size > 150_000:
            print(f"warning: {png} is {png.stat().st_size / 1e3:.0f} KB", file=sys.stderr)
    print(f"updated {RESULTS_MD.name}; figures: {', '.join(sorted(sizes))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
