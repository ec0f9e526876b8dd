"""Convolutional models on XLA:CPU: the scanned training loop against the host-stepped one.

XLA:CPU runs a convolution inside a loop or branch body far slower than at the top level of a
program (jax-ml/jax#12868), and a seed-vmapped convolution (a grouped one) slower than the
plain ones. ``train_and_evaluate`` therefore steps a model with convolutions from the host on
a CPU (``subspace_jax.train.loops_on_host``). This script trains the same run both ways, side
by side in one process (alternating, so both see the same load), and records the result's
``step_time_ms`` (median over chunks of chunk time / steps, compilation excluded) and the
run's wall time.

Usage (from the repository root):
  python benchmarks/conv_loop.py --mnist ../shared/data/mnist \
      --cifar ../shared/data/cifar10/cifar-10-batches-bin
Writes ``results/conv_loop.json`` (or ``--out``) and a bar chart beside it (``.png``). With
``--out benchmarks/results/conv_loop.json``, ``benchmarks/summarize.py`` puts it in
BENCHMARKS.md. About 35 minutes on a 2-core machine, most of it the scanned ResNet-20 runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path

import numpy as np

from subspace_jax.train import TrainConfig, _loop, load_data, train_and_evaluate


def cases(mnist: str, cifar: str) -> dict[str, TrainConfig]:
    """The runs compared: three seeds in a Fastfood subspace, as an ``id`` search trains."""
    common = dict(dim=1000, projection="fastfood", seeds=(0, 1, 2), epochs=1)
    return {
        "lenet_mnist": TrainConfig(
            model="lenet", dataset="mnist", data_dir=mnist, max_steps=64, **common
        ),
        "resnet20_cifar10": TrainConfig(
            model="resnet20",
            dataset="cifar10",
            data_dir=cifar,
            batch_size=32,
            max_steps=16,
            **common,
        ),
    }


def run(config: TrainConfig, data, host: bool) -> dict:
    """One run with the loop forced to ``host`` (True) or the scan (False)."""
    original = _loop._loops_on_host
    _loop._loops_on_host = lambda setup: host
    try:
        result = train_and_evaluate(config, data).result
    finally:
        _loop._loops_on_host = original
    return {
        "loop": "host" if host else "scan",
        "step_time_ms": result["step_time_ms"],
        "wall_time_s": result["wall_time_s"],
        "test_accuracy": result["test_accuracy"],
        "load_average": os.getloadavg()[0],
    }


def summarize_case(config: dict, records: list[dict]) -> dict:
    """One case of the output: its config, its records, each loop's median step time over the
    repeats and their ratio (``speedup``, scan over host)."""
    med = {
        loop: float(np.median([r["step_time_ms"] for r in records if r["loop"] == loop]))
        for loop in ("scan", "host")
    }
    return {
        "config": config,
        "records": records,
        "median_step_ms": med,
        "speedup": med["scan"] / med["host"],
    }


def plot(cases_out: dict, path: Path) -> None:
    """Median step time of the two loops for each case, on a log axis, with the ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cases_out)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, loop in enumerate(("scan", "host")):
        ms = [cases_out[n]["median_step_ms"][loop] for n in names]
        xs = [j + (i - 0.5) * 0.38 for j in range(len(names))]
        ax.bar(xs, ms, width=0.38, label=f"{loop} loop")
    for j, n in enumerate(names):
        top = max(cases_out[n]["median_step_ms"].values())
        ax.text(j, top * 1.15, f"{cases_out[n]['speedup']:.1f}x", ha="center")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylim(top=3 * max(max(c["median_step_ms"].values()) for c in cases_out.values()))
    ax.set_ylabel("ms a step (3 seeds, median)")
    ax.set_title("conv models on XLA:CPU: scanned vs host-stepped loop", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", default="../shared/data/mnist")
    parser.add_argument("--cifar", default="../shared/data/cifar10/cifar-10-batches-bin")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="results/conv_loop.json")
    args = parser.parse_args(argv)
    out = {"host": platform.machine(), "cpus": os.cpu_count(), "cases": {}}
    for name, config in cases(args.mnist, args.cifar).items():
        data = load_data(config)
        records = []
        for rep in range(args.repeats):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for host in order:
                rec = {"repeat": rep, **run(config, data, host)}
                records.append(rec)
                print(name, json.dumps(rec), flush=True)
        case = out["cases"][name] = summarize_case(dataclasses.asdict(config), records)
        med = case["median_step_ms"]
        print(
            f"{name}: scan {med['scan']:.1f} ms, host {med['host']:.1f} ms a step "
            f"({case['speedup']:.1f}x)",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    png = Path(args.out).with_suffix(".png")
    plot(out["cases"], png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
