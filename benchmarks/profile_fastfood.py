"""Where a Fastfood training step spends its time, next to the direct step (same process).

Times, on the CIFAR-10 MLP (D = 472,610, batch 128), the direct training step, the subspace
step, and the pieces of one Fastfood product: the forward (P w), the transpose (P^T g), one
Walsh-Hadamard transform of the padded length and one gather of that length. Writes
``benchmarks/results/fastfood_profile.json`` and ``.md``.

Usage: ``python benchmarks/profile_fastfood.py [--dims 500,4500,50000,472610] [--repeats 30]``
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
from subspace_jax.models import build_model
from subspace_jax.projections import fwht
from subspace_jax.train import make_train_step, median_ms, time_call

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="500,4500,50000,472610")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    model = build_model("mlp", (28, 28, 3), 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 28, 28, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 128), jnp.int32)
    theta0 = model.init(jax.random.key(0))
    opt = optax.adam(1e-3)
    step = jax.jit(make_train_step(model.apply, opt))

    def ms(fn, *a):
        return median_ms(time_call(lambda: fn(*a), args.repeats))

    def step_ms(sub):
        t = sj.init_trainable(sub)
        o = opt.init(t)
        return median_ms(time_call(lambda: step(sub, t, o, x, y)[2], args.repeats, warmup=2))

    direct_before = step_ms(sj.init_subspace(jax.random.key(1), theta0, 0))
    proj = sj.get_projection("fastfood")
    rows = []
    for d in [int(v) for v in args.dims.split(",")]:
        sub = sj.init_subspace(jax.random.key(1), theta0, d, projection="fastfood")
        state = sub.proj_states[0]
        D = sub.num_params
        nb, n = state.gauss.shape
        w = jnp.asarray(rng.standard_normal(d), jnp.float32)
        g = jnp.asarray(rng.standard_normal(D), jnp.float32)
        v = jnp.asarray(rng.standard_normal((nb, n)), jnp.float32)
        idx = jnp.asarray(rng.permutation(nb * n), jnp.int32)
        fwd = jax.jit(proj.apply)
        rmv = jax.jit(proj.transpose)
        wht = jax.jit(lambda a: fwht(a))
        gather = jax.jit(lambda a, i: jnp.take(a.reshape(-1), i, mode="clip"))
        rows.append(
            {
                "dim": d,
                "num_params": D,
                "blocks": nb,
                "block_size": n,
                "step_ms": step_ms(sub),
                "forward_ms": ms(fwd, state, w),
                "transpose_ms": ms(rmv, state, g),
                "fwht_ms": ms(wht, v),
                "gather_ms": ms(gather, v, idx),
            }
        )
        print(rows[-1], flush=True)
    direct_after = step_ms(sj.init_subspace(jax.random.key(1), theta0, 0))
    direct = float(np.median([direct_before, direct_after]))
    for r in rows:
        r["direct_step_ms"] = direct
        r["ratio"] = r["step_ms"] / direct
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fastfood_profile.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| d | blocks x size | step / direct | step ms | direct ms | P w ms | P^T g ms "
        "| one WHT ms | one gather ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dim']:,} | {r['blocks']} x {r['block_size']:,} | {r['ratio']:.2f}x | "
            f"{r['step_ms']:.2f} | {r['direct_step_ms']:.2f} | {r['forward_ms']:.2f} | "
            f"{r['transpose_ms']:.2f} | {r['fwht_ms']:.2f} | {r['gather_ms']:.2f} |"
        )
    (OUT / "fastfood_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
