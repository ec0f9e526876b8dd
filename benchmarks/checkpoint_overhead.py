"""Checkpoint overhead: an epoch's time with orbax checkpoints against one without.

Trains the MNIST MLP (direct) for a few epochs, alternately without checkpoints, with a
checkpoint at each epoch end (the default of ``train``), and optionally also every
``--every-steps`` steps. An epoch's time is the time between two consecutive ``epoch``
progress events (so it includes the epoch-end save; the first epoch, with compilation, is
left out). ``overhead = median epoch with checkpoints / median epoch without - 1``; the
issue's target is under 5%.

Usage:
  python benchmarks/checkpoint_overhead.py --data-dir /work/shared/data/mnist --repeats 3
Writes ``results/checkpoint_overhead.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from subspace_jax.train import CheckpointOptions, TrainConfig, load_data, train_and_evaluate


def epoch_times(config, data, checkpoint) -> list[float]:
    stamps = []

    def progress(event):
        if event["event"] == "epoch":
            stamps.append(time.perf_counter())

    train_and_evaluate(config, data, progress=progress, checkpoint=checkpoint)
    return list(np.diff(stamps))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/work/shared/data/mnist")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every-steps", type=int, default=100)
    parser.add_argument("--out", default="results/checkpoint_overhead.json")
    args = parser.parse_args(argv)

    config = TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs
    )
    data = load_data(config)
    kinds = {"none": None, "epoch_end": {}, "every_steps": {"every_steps": args.every_steps}}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(args.repeats):
        for kind, extra in kinds.items():
            folder = Path(tempfile.mkdtemp(prefix="ckpt-overhead-"))
            options = None if extra is None else CheckpointOptions(folder, **extra)
            got = epoch_times(config, data, options)
            shutil.rmtree(folder, ignore_errors=True)
            times[kind].extend(got)
            print(f"rep {rep} {kind:11s}: epochs {[round(t, 3) for t in got]} s", flush=True)
    base = float(np.median(times["none"]))
    summary = {
        k: {
            "median_epoch_s": float(np.median(v)),
            "overhead": float(np.median(v)) / base - 1.0,
        }
        for k, v in times.items()
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "dataset": args.dataset,
        "every_steps": args.every_steps,
        "load_average": os.getloadavg()[0],
        "summary": summary,
        "epoch_times_s": times,
    }
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
