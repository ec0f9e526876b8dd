#!/usr/bin/env bash
# The CPU benchmark grid of the issue: MLP on MNIST (D = 159,010) and CIFAR-10 (D = 472,610),
# d in {100, 500, 1000, 4500, 10000, 50000, D}, every projection worth running; a fresh
# process per cell (isolated peak RSS). Cells estimated above 60 s, or that do not fit 70% of
# MemAvailable, are reported as skipped. About an hour on 2 shared cores.
# Writes benchmarks/results/cpu.json, then BENCHMARKS.md and the plots (summarize.py).
# Extra arguments go to run_grid.py (e.g. --steps 10).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
nice -n 10 python benchmarks/run_grid.py \
    --out benchmarks/results/cpu.json \
    --steps 5 --warmup 2 --max-cell-seconds 60 --isolate cell "$@"
python benchmarks/summarize.py
