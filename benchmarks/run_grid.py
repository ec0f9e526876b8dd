"""Run the benchmark grid of the issue and write one JSON list of records.

Models: the MLP on MNIST (D = 159,010) and on CIFAR-10 at 28x28x3 (D = 472,610); d in
``DIMS`` (``full`` is d = D); every projection in ``PROJECTIONS``, the slow or large ones only
up to ``SMALL_D_CAP``. Then the real architectures, ResNet-20 (BatchNorm, D = 269,722) and
the ViT (D = 811,146) on CIFAR-10, with the matrix-free projections only (``ARCH_*``; their
BatchNorm statistics are updated by every timed step, as in training). Cells that do not fit
the memory budget, or whose estimated run time exceeds ``--max-cell-seconds``, are reported as
skipped with the reason. The JSON is rewritten after every record, so an interrupted run keeps
what it measured.

Usage (see run_cpu.sh and run_gpu.sh):
  python benchmarks/run_grid.py --out benchmarks/results/cpu.json --png benchmarks/results/cpu.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from subspace_jax import results
from subspace_jax.bench import plot_benchmark, run_benchmark

MODELS = (("mlp", "cifar10"), ("mlp", "mnist"))
DIMS = (100, 500, 1000, 4500, 10000, 50000, "full")
PROJECTIONS = (
    "fastfood",
    "sparse",
    "sparse_very",
    "dense_hash",
    "orthogonal_hadamard",
    "dense",
    "sparse_achlioptas",
    "dense_regen",
    "orthogonal",
)
#: Projections the issue runs at small d only (slow, or as large as dense).
SMALL_D_CAP = {"sparse_achlioptas": 1000, "dense_regen": 1000, "orthogonal": 1000}
#: Architectures (issue 11), timed with the matrix-free projections (O(D) state) only.
ARCH_MODELS = (("resnet20", "cifar10"), ("vit", "cifar10"))
ARCH_PROJECTIONS = ("fastfood", "orthogonal_hadamard", "dense_hash")
ARCH_DIMS = (1000, 10000, 50000)


def _round(obj, digits=4):
    """Round floats to ``digits`` significant digits (a small, commit-able JSON)."""
    if isinstance(obj, float) and math.isfinite(obj) and obj != 0:
        return round(obj, digits - 1 - int(math.floor(math.log10(abs(obj)))))
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, digits) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the records")
    p.add_argument("--png", default=None, help="plot of the step-time and memory ratios")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-cell-seconds", type=float, default=60.0)
    p.add_argument("--isolate", default="cell", choices=("cell", "projection", "none"))
    p.add_argument(
        "--models",
        default=",".join(f"{m}:{d}" for m, d in MODELS),
        help="models timed with --projections at --dims ('' for none)",
    )
    p.add_argument("--projections", default=",".join(PROJECTIONS))
    p.add_argument("--dims", default=",".join(str(d) for d in DIMS))
    p.add_argument(
        "--arch-models",
        default=",".join(f"{m}:{d}" for m, d in ARCH_MODELS),
        help="architectures timed with --arch-projections at --arch-dims ('' for none)",
    )
    p.add_argument("--arch-projections", default=",".join(ARCH_PROJECTIONS))
    p.add_argument("--arch-dims", default=",".join(str(d) for d in ARCH_DIMS))
    args = p.parse_args(argv)

    models = [tuple(m.split(":")) for m in args.models.split(",") if m]  # '': none
    projections = args.projections.split(",")
    dims = [d if d == "full" else int(d) for d in args.dims.split(",")]
    records: list[dict] = []
    t0 = time.perf_counter()

    def progress(rec: dict) -> None:
        records.append(_round(rec))
        results.write_json(args.out, records)
        what = rec.get("skipped") or (
            f"{rec['step_time_ms']:.2f} ms = {rec['ratio']:.2f}x direct, "
            f"peak {rec['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
        print(
            f"[{time.perf_counter() - t0:6.0f}s] {rec['model']}/{rec['dataset']} "
            f"{rec['projection']} d={rec['dim']}: {what}",
            file=sys.stderr,
            flush=True,
        )

    arch = [tuple(m.split(":")) for m in args.arch_models.split(",") if m]
    arch_dims = [d if d == "full" else int(d) for d in args.arch_dims.split(",")]
    grid = [(m, d, dims, projections) for m, d in models]
    grid += [(m, d, arch_dims, args.arch_projections.split(",")) for m, d in arch]
    final: list[dict] = []
    for model, dataset, model_dims, model_projections in grid:
        final += run_benchmark(
            model,
            dataset,
            model_dims,
            model_projections,
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            isolate=args.isolate,
            max_cell_seconds=args.max_cell_seconds or None,
            dim_caps=SMALL_D_CAP,
            progress=progress,
        )
    records = [_round(r) for r in final]  # the grid's order: model, projection, d
    results.write_json(args.out, records)
    if args.png:
        plot_benchmark(records, args.png)
    print(f"{len(records)} records in {time.perf_counter() - t0:.0f}s: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
