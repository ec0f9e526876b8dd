"""How often Fastfood inits were non-finite before the fix, and which published runs it touched.

Before the fix, Fastfood's normals came from ``u = (k + 0.5) 2^-24`` in float32, which rounds
to ``u = 1`` (``z = inf``) for the top 24-bit value ``k``; the fixed map
(:func:`subspace_jax.projections._fastfood.normal_from_bits`) is exact. This script

1. measures the fraction of non-finite inits over many random keys with the old map and with
   the fixed one, at the sizes of the issue (MNIST MLP D = 159,010 at d = 256, CIFAR-10 MLP
   D = 472,610 at d = 4,500 and 50,000);
2. recomputes, with the old map, the Fastfood state of every (model, seed, d) that a published
   Fastfood result trained (the experiment configs' ``--projection fastfood`` runs and the
   MNIST ``id`` example of docs/method.md), with the training loop's own key rule, and lists
   those that were non-finite: only those results could have been corrupted.

Usage::

    python experiments/fastfood_init_audit.py [--keys 300] [--out results/fastfood_init_audit.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from subspace_jax.models import build_model
from subspace_jax.projections import _fastfood as ff
from subspace_jax.train import TrainConfig, config_layout, input_shape, run_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "configs"

#: (model, D, d) of the issue's measurement.
RATE_CASES = [
    ("mnist mlp", 159_010, 256),
    ("cifar10 mlp", 472_610, 4_500),
    ("cifar10 mlp", 472_610, 50_000),
]
#: The MNIST MLP ``id`` example of docs/method.md: seeds 0-2, the dims its search visited.
ID_EXAMPLE = {
    "model": "mlp",
    "dataset": "mnist",
    "seeds": [0, 1, 2],
    "dims": [256, 512, 1024, 724, 609, 588, 631, 652],
}

#: A control: the issue's failing case (MNIST MLP seed 4: inf at d = 256 and 32,768, fine at
#: 38,968). The audit must find exactly these two with the old map, or it checks the wrong keys.
KNOWN_BAD = {"model": "mlp", "dataset": "mnist", "seeds": [4], "dims": [256, 32768, 38968]}


def old_normals(bits):
    """The map before the fix (kept here only to measure what it did)."""
    u = ((bits >> 8).astype(jnp.float32) + 0.5) * (2.0**-24)
    return math.sqrt(2.0) * jax.lax.erf_inv(2.0 * u - 1.0)


def _finite(state) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in (state.gauss, state.scale)]).all()


def failure_rate(D: int, d: int, num_keys: int, chunk: int = 10) -> int:
    """Number of non-finite inits among ``num_keys`` random keys (with the current map)."""
    check = jax.jit(jax.vmap(lambda k: _finite(ff._fastfood_init(k, D, d, True))))
    bad = 0
    for start in range(0, num_keys, chunk):
        keys = jax.random.split(jax.random.key(10_000 + start), min(chunk, num_keys - start))
        bad += int((~check(keys)).sum())
    return bad


def published_fastfood_runs() -> list[dict]:
    """(model, dataset, seeds, dims, source) of every Fastfood run in the experiment configs."""
    runs = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        for run in json.loads(path.read_text())["runs"]:
            args = run["args"]
            opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
            if opts.get("--projection") != "fastfood":
                continue
            dims = opts.get("--dims") or opts.get("--dim")
            runs.append(
                {
                    "source": f"{path.stem}/{run['name']}",
                    "model": opts["--model"],
                    "dataset": opts["--dataset"],
                    "seeds": [int(s) for s in opts.get("--seeds", "0").split(",")],
                    "dims": [int(x) for x in dims.split(",")],
                }
            )
    runs.append(dict(ID_EXAMPLE, source="docs/method.md id example (MNIST MLP)"))
    runs.append(
        dict(KNOWN_BAD, source="control: the issue's seed 4 (must be found before the fix)")
    )
    return runs


def nonfinite_published(runs: list[dict]) -> list[dict]:
    """The (source, seed, d) whose Fastfood state is non-finite with the current map."""
    found = []
    for run in runs:
        model = build_model(run["model"], input_shape(run["model"], run["dataset"]), 10)
        theta0 = jax.eval_shape(model.init, jax.random.key(0))
        for d in run["dims"]:
            config = TrainConfig(
                model=run["model"],
                dataset=run["dataset"],
                dim=d,
                projection="fastfood",
                seeds=tuple(run["seeds"]),
            )
            layout = config_layout(config, theta0)
            keys = run_keys(run["seeds"])
            for seed, key in zip(run["seeds"], keys, strict=True):
                _, k_proj = jax.random.split(key)
                for gi, g in enumerate(layout.groups):
                    state = ff._fastfood_init(jax.random.fold_in(k_proj, gi), g.size, g.dim, True)
                    if not bool(_finite(state)):
                        found.append({"source": run["source"], "seed": seed, "d": d, "D": g.size})
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=300, help="random keys per size")
    parser.add_argument("--out", default="results/fastfood_init_audit.json")
    args = parser.parse_args(argv)
    report = {"keys_per_case": args.keys, "rates": [], "published_nonfinite": {}}
    runs = published_fastfood_runs()
    for label, normals in (("fixed", ff.normal_from_bits), ("before_fix", old_normals)):
        ff.normal_from_bits = normals  # the init is traced anew after clear_caches
        jax.clear_caches()
        for name, D, d in RATE_CASES:
            bad = failure_rate(D, d, args.keys)
            report["rates"].append(
                {"map": label, "case": name, "D": D, "d": d, "nonfinite": bad, "keys": args.keys}
            )
            print(
                f"{label:10s} {name} D={D:,} d={d:,}: {bad} non-finite in {args.keys} inits",
                flush=True,
            )
        report["published_nonfinite"][label] = nonfinite_published(runs)
        print(
            f"{label:10s} published runs with a non-finite init: "
            f"{report['published_nonfinite'][label]}",
            flush=True,
        )
    report["published_runs_checked"] = runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
