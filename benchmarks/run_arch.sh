#!/usr/bin/env bash
# The real architectures of issue 11 on the CPU: ResNet-20 (D = 269,722) and the ViT
# (D = 811,146) on CIFAR-10 shapes, timed with the matrix-free projections (fastfood,
# orthogonal_hadamard, dense_hash) at d in {1000, 10000, 50000} beside the direct step, the
# same bench method as run_cpu.sh (a fresh process per cell). Fewer steps than the MLP grid:
# a ResNet-20 step of batch 128 takes seconds on 2 cores. About 55 minutes there, half of it
# the ViT's dense_hash at d = 50000, which runs past the 30-minute cell limit (reported skipped).
# Writes benchmarks/results/cpu_arch.json, then BENCHMARKS.md and the plots (summarize.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
python benchmarks/run_grid.py --models '' \
    --out benchmarks/results/cpu_arch.json \
    --steps 3 --warmup 1 --max-cell-seconds 0 --isolate cell "$@"
python benchmarks/summarize.py
