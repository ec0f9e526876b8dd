"""Seeds per second and steps per second against the number of devices.

Two workloads, each timed by ``train_and_evaluate``'s median step time (the step blocks on
its result, so it is the device time of one step plus its dispatch):

* ``seeds``: ``--seeds`` seeds trained together, spread over the mesh's seed axis
  (``seeds = gcd(seeds, devices)``); reported as seed-steps per second
  (``seeds * 1000 / step_ms``);
* ``data``: one seed, the batch split over the data axis (data parallel); steps per second.

On CPU the devices are forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), one fresh process per count. They
all share this machine's cores (two here), so the CPU figures show the overhead of sharding
(partitioning, collectives, dispatch), not a speed-up: more forced devices cannot make
two cores faster. With ``--platform gpu`` the real accelerators are used (1, 2, 4, ... up to
``jax.device_count()``), which is where a speed-up can show.

Writes ``OUT/scaling.json`` and ``OUT/scaling.png`` (OUT defaults to ``results/scaling``).

    python benchmarks/scaling.py                      # CPU, forced 1, 2, 4, 8 devices
    python benchmarks/scaling.py --platform gpu       # the GPUs of this machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, sys
import jax
from subspace_jax import sharding
from subspace_jax.train import TrainConfig, load_data, train_and_evaluate

opts = json.loads(sys.argv[1])
n = opts["devices"]
devices = jax.devices()[:n]
assert len(devices) == n, (n, jax.devices())
base = TrainConfig(
    model=opts["model"], dataset="digits", dim=opts["dim"], projection=opts["projection"],
    epochs=1, max_steps=opts["steps"], batch_size=opts["batch_size"],
)
data = load_data(base)
out = {"devices": n, "backend": jax.default_backend(), "device_kind": devices[0].device_kind}
for name, seeds, spec in (
    ("seeds", tuple(range(opts["seeds"])), sharding.MeshSpec()),
    ("data", (0,), sharding.MeshSpec(seeds=1, data=n)),
):
    import dataclasses
    cfg = dataclasses.replace(base, seeds=seeds)
    plan = sharding.MeshPlan(tuple(devices), spec)
    res = train_and_evaluate(cfg, data, mesh=plan)
    out[name] = {
        "seeds": len(seeds),
        "mesh": res["mesh"],
        "step_time_ms": res["step_time_ms"],
        "steps_per_s": 1000.0 / res["step_time_ms"],
        "seed_steps_per_s": len(seeds) * 1000.0 / res["step_time_ms"],
        "wall_time_s": res["wall_time_s"],
        "val_accuracy": res["val_accuracy"],
    }
print(json.dumps(out))
"""


def measure(count: int, opts: dict, platform: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps({**opts, "devices": count})],
        capture_output=True,
        text=True,
        env=env,
        timeout=opts["timeout"],
    )
    if proc.returncode:
        raise SystemExit(f"{count} devices failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["devices"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(counts, [r["seeds"]["seed_steps_per_s"] for r in records], "o-")
    axes[0].set_title(f"{records[0]['seeds']['seeds']} seeds over the seed axis")
    axes[0].set_ylabel("seed-steps per second")
    axes[1].plot(counts, [r["data"]["steps_per_s"] for r in records], "o-")
    axes[1].set_title("one seed, batch over the data axis")
    axes[1].set_ylabel("steps per second")
    for ax in axes:
        ax.set_xlabel("devices")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--counts", default=None, help="device counts (default 1,2,4,8 on cpu)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--dim", type=int, default=1000)
    p.add_argument("--projection", default="fastfood")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "results" / "scaling"))
    p.add_argument("--replot", action="store_true", help="redraw OUT/scaling.png from its JSON")
    args = p.parse_args(argv)
    if args.replot:
        summary = json.loads((Path(args.out) / "scaling.json").read_text())
        c = summary["config"]
        plot(
            summary["records"],
            Path(args.out) / "scaling.png",
            f"{c['model']} on digits, d = {c['dim']} ({c['projection']}), batch "
            f"{c['batch_size']}, {summary['platform']}:\n{summary['note']}",
        )
        return 0
    if args.counts:
        counts = [int(c) for c in args.counts.split(",")]
    elif args.platform == "cpu":
        counts = [1, 2, 4, 8]
    else:
        import jax

        n = jax.device_count()
        counts = [c for c in (1, 2, 4, 8, 16) if c <= n]
    opts = {
        "model": args.model,
        "dim": args.dim,
        "projection": args.projection,
        "seeds": args.seeds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "timeout": args.timeout,
    }
    records = []
    for count in counts:
        t = time.perf_counter()
        rec = measure(count, opts, args.platform)
        records.append(rec)
        print(
            f"{count} device(s): {rec['seeds']['seed_steps_per_s']:.1f} seed-steps/s "
            f"({args.seeds} seeds, mesh {rec['seeds']['mesh']}), "
            f"{rec['data']['steps_per_s']:.1f} steps/s (1 seed, mesh {rec['data']['mesh']}) "
            f"[{time.perf_counter() - t:.0f} s]",
            flush=True,
        )
    note = (
        "forced host devices sharing this machine's CPU cores: the figures show the overhead "
        "of sharding, not a speed-up"
        if args.platform == "cpu"
        else "real accelerators"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "platform": args.platform,
        "cpu_count": os.cpu_count(),
        "note": note,
        "config": opts,
        "records": records,
    }
    (out / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(
        records,
        out / "scaling.png",
        f"{args.model} on digits, d = {args.dim} ({args.projection}), batch {args.batch_size}, "
        f"{args.platform}:\n{note}",
    )
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
