#!/usr/bin/env bash
# The same grid on one GPU, in well under 8 minutes: one process per projection (dims in
# ascending order, so the allocator's peak_bytes_in_use is the largest d's), 20 timed steps,
# cells estimated above 20 s skipped. Writes $OUT_DIR/gpu.json and gpu.png
# (OUT_DIR defaults to benchmarks/results); then run `python benchmarks/summarize.py`.
# Needs jax with CUDA; run from a checkout (PYTHONPATH is set to it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-benchmarks/results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
python benchmarks/run_grid.py \
    --out "$OUT_DIR/gpu.json" --png "$OUT_DIR/gpu.png" \
    --steps 20 --warmup 3 --max-cell-seconds 20 --isolate projection "$@"

# Scaling: seed-steps/s (8 seeds over the seed axis) and steps/s (one seed, batch over the
# data axis) on 1, 2, 4, ... of this machine's GPUs (one point with one GPU). Writes
# $OUT_DIR/scaling/scaling.json and scaling.png. SKIP_SCALING=1 leaves it out.
if [ -z "${SKIP_SCALING:-}" ]; then
    python benchmarks/scaling.py --platform gpu --out "$OUT_DIR/scaling"
fi
