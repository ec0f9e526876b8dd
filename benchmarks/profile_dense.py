"""Where a stored dense P's training step spends its time, against the bandwidth floor.

On the MNIST MLP (D = 159,010, batch 128), in one process: the copy bandwidth, the floor
``2 x D x d x 4 bytes / bandwidth`` (P read once forward, once backward), the forward product
``P w`` alone, the transpose ``g @ P`` alone, their sum and the whole subspace step. Writes
``benchmarks/results/dense_profile.json`` and ``.md``.

Usage: ``python benchmarks/profile_dense.py [--dims 100,500,1000] [--repeats 20]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subspace_jax as sj
from subspace_jax.bench import copy_bandwidth
from subspace_jax.models import build_model
from subspace_jax.train import make_train_step, median_ms, time_call

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="100,500,1000")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    model = build_model("mlp", (28, 28, 1), 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 128), jnp.int32)
    theta0 = model.init(jax.random.key(0))
    opt = optax.adam(1e-3)
    step = jax.jit(make_train_step(model.apply, opt))
    proj = sj.get_projection("dense")
    fwd, rmv = jax.jit(proj.apply), jax.jit(proj.transpose)

    def ms(fn, *a):
        return median_ms(time_call(lambda: fn(*a), args.repeats))

    rows = []
    for d in [int(v) for v in args.dims.split(",")]:
        sub = sj.init_subspace(jax.random.key(1), theta0, d, projection="dense")
        state, D = sub.proj_states[0], sub.num_params
        t = sj.init_trainable(sub)
        o = opt.init(t)
        w = jnp.asarray(rng.standard_normal(d), jnp.float32)
        g = jnp.asarray(rng.standard_normal(D), jnp.float32)
        bw = copy_bandwidth()
        floor = 2 * D * d * 4 / bw * 1e3
        row = {
            "dim": d,
            "num_params": D,
            "copy_bandwidth_gbs": bw / 1e9,
            "floor_ms": floor,
            "forward_ms": ms(fwd, state, w),
            "transpose_ms": ms(rmv, state, g),
            "step_ms": ms(lambda s_, t_, o_: step(s_, t_, o_, x, y)[2], sub, t, o),
        }
        row["one_pass_floor_ms"] = floor / 2
        rows.append(row)
        print(row, flush=True)
        del sub, state
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dense_profile.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| d | copy GB/s | floor ms (2 reads of P) | P w ms | P^T g ms | step ms | "
        "P w / one-read floor | P^T g / one-read floor | step / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        half = r["one_pass_floor_ms"]
        lines.append(
            f"| {r['dim']:,} | {r['copy_bandwidth_gbs']:.1f} | {r['floor_ms']:.2f} | "
            f"{r['forward_ms']:.2f} | {r['transpose_ms']:.2f} | {r['step_ms']:.2f} | "
            f"{r['forward_ms'] / half:.2f}x | {r['transpose_ms'] / half:.2f}x | "
            f"{r['step_ms'] / r['floor_ms']:.2f}x |"
        )
    (OUT / "dense_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
