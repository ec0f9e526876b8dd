"""Run one experiment: a JSON config of CLI invocations, passed to ``subspace_jax.cli.main``.

An experiment is ``experiments/configs/<name>.json``::

    {
      "description": "what it measures",
      "figure": "which figure of the seed report / Li et al. 2018 it reproduces",
      "runs": [
        {"name": "dense_d750", "description": "...", "args": ["train", "--model", "mlp", ...]},
        {"name": "sweep_fastfood", "description": "...", "args": ["sweep", "--dims", ...]}
      ]
    }

Each run's output path is added here, never written in the config: a ``train`` run gets
``--json results/<name>/<run>.json`` and a ``sweep`` or ``id`` run ``--out
results/<name>/<run>``. Files that runs pass to each other (``train --save-params`` then
``id --theta0``) are named ``{out}/<file>`` in the config; ``{out}`` becomes the
experiment's results folder (``results/<name>`` or ``results/quick/<name>``). Runs
are resumable: a ``train`` run is skipped when its JSON exists and was made by the same
configuration (every field of its ``config``) on the same data (its ``data_fingerprint``), and
is trained again otherwise; a ``sweep`` reuses every run already in its folder whose
configuration and data match (the sweep command does that itself). ``--quick`` smoke-tests
a config in seconds: one epoch of a few steps, the first two dims of each sweep, results under
``results/quick/<name>/``.

Usage (from the repository root)::

    python experiments/run.py mnist_mlp_sweep            # the whole experiment
    python experiments/run.py mnist_mlp_sweep --quick    # smoke test
    python experiments/run.py mnist_mlp_sweep --only fastfood --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "configs"
RESULTS_DIR = Path("results")

#: What ``--quick`` sets on every training invocation.
QUICK_SETTINGS = {"--epochs": "1", "--max-steps": "3"}
#: How many dims of a sweep ``--quick`` keeps.
QUICK_DIMS = 2
#: What ``--quick`` sets on an ``id`` search: a short doubling from a small d.
QUICK_ID = {"--d-start": "16", "--d-max": "32", "--precision": "1"}
#: The subcommands a run may use.
COMMANDS = ("train", "sweep", "id")
#: Placeholder for the experiment's results folder in a run's arguments.
OUT = "{out}"


def config_names() -> list[str]:
    """Names of every experiment config, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str) -> dict:
    """Read and check ``experiments/configs/<name>.json``.

    Raises:
      ValueError: unknown name, or a config without ``description``, ``figure`` and a
        non-empty ``runs`` list of ``{"name", "description", "args"}`` with unique names and a
        ``train`` or ``sweep`` subcommand.
    """
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(config_names())}")
    with open(path) as f:
        config = json.load(f)
    for key in ("description", "figure", "runs"):
        if key not in config:
            raise ValueError(f"{path.name}: missing {key!r}")
    runs = config["runs"]
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path.name}: 'runs' must be a non-empty list")
    seen = set()
    for run in runs:
        missing = {"name", "description", "args"} - set(run)
        if missing:
            raise ValueError(f"{path.name}: run {run.get('name')!r} lacks {sorted(missing)}")
        if run["name"] in seen:
            raise ValueError(f"{path.name}: duplicate run name {run['name']!r}")
        seen.add(run["name"])
        args = run["args"]
        if not args or args[0] not in COMMANDS:
            raise ValueError(
                f"{path.name}: run {run['name']!r} must start with one of {COMMANDS}, "
                f"got {args[:1]}"
            )
        if any(a in ("--json", "--out") for a in args):
            raise ValueError(
                f"{path.name}: run {run['name']!r} sets --json/--out; run.py adds the paths"
            )
    return config


def set_flag(args: Sequence[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced by ``value`` (appended if absent)."""
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def get_flag(args: Sequence[str], flag: str) -> str | None:
    args = list(args)
    return args[args.index(flag) + 1] if flag in args else None


def invocation(experiment: str, run: dict, *, quick: bool = False) -> tuple[list[str], Path]:
    """The full argument list for ``cli.main`` and the output path of one run."""
    args = list(run["args"])
    base = RESULTS_DIR / "quick" / experiment if quick else RESULTS_DIR / experiment
    args = [a.replace(OUT, str(base)) for a in args]
    if quick:
        for flag, value in QUICK_SETTINGS.items():
            args = set_flag(args, flag, value)
        if args[0] == "sweep":
            dims = get_flag(args, "--dims").split(",")
            args = set_flag(args, "--dims", ",".join(dims[:QUICK_DIMS]))
        if args[0] == "id":
            for flag, value in QUICK_ID.items():
                args = set_flag(args, flag, value)
    if args[0] == "train":
        out = base / f"{run['name']}.json"
        args += ["--json", str(out)]
    else:
        out = base / run["name"]
        args += ["--out", str(out)]
    return args, out


def stale_reason(args: Sequence[str], out: Path, fingerprints: dict | None = None) -> str | None:
    """Why the JSON at ``out`` is not the result of the ``train`` invocation ``args``.

    Returns None when it was made by the same configuration on the same data (reuse it);
    otherwise a short reason (it is unreadable, the config changed, or the data did). The data
    is loaded to fingerprint it; ``fingerprints`` caches the fingerprints between calls.
    """
    from subspace_jax import cli
    from subspace_jax.data import data_fingerprint
    from subspace_jax.train import load_data

    try:
        existing = json.loads(out.read_text())
    except (OSError, ValueError):
        return "its JSON is unreadable"
    if not isinstance(existing, dict):
        return "its JSON is not a result"
    ns = cli.build_parser().parse_args(list(args))
    config = cli._subspace_kind_config(ns, cli.config_from_args(ns))
    if existing.get("config") != json.loads(json.dumps(config.to_dict())):
        return "its config changed"
    cache = {} if fingerprints is None else fingerprints
    which = (config.dataset, config.data_dir, config.val_size, config.data_seed, config.image_size)
    if which not in cache:
        cache[which] = data_fingerprint(load_data(config))
    if existing.get("data_fingerprint") != cache[which]:
        return "its data changed"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment", nargs="?", help=f"one of: {', '.join(config_names())}")
    parser.add_argument("--quick", action="store_true", help="a few steps of each run")
    parser.add_argument("--only", action="append", help="run only these run names")
    parser.add_argument(
        "--force", action="store_true", help="rerun train runs whose JSON is up to date"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the invocations only")
    parser.add_argument("--list", action="store_true", help="list the experiments")
    opts = parser.parse_args(argv)
    if opts.list or not opts.experiment:
        for name in config_names():
            print(f"{name:28s} {load_config(name)['description']}")
        return 0

    from subspace_jax import cli

    os.chdir(ROOT)  # configs use paths relative to the repository root (../shared/data/...)
    config = load_config(opts.experiment)
    runs = config["runs"]
    if opts.only:
        unknown = sorted(set(opts.only) - {r["name"] for r in runs})
        if unknown:
            raise SystemExit(f"error: unknown run(s) {unknown} in {opts.experiment}")
        runs = [r for r in runs if r["name"] in opts.only]
    status = 0
    fingerprints: dict = {}
    for run in runs:
        args, out = invocation(opts.experiment, run, quick=opts.quick)
        line = "subspace-jax " + " ".join(args)
        print(f"== {opts.experiment}/{run['name']}: {line}", file=sys.stderr, flush=True)
        if opts.dry_run:
            continue
        if args[0] == "train" and out.exists() and not opts.force:
            reason = stale_reason(args, out, fingerprints)
            saved = get_flag(args, "--save-params")
            if reason is None and saved is not None and not Path(saved).is_file():
                reason = f"its checkpoint {saved} is missing"
            if reason is None:
                print(f"   exists, skipped: {out}", file=sys.stderr, flush=True)
                continue
            print(f"   {out} exists but {reason}: training again", file=sys.stderr, flush=True)
        if args[0] == "train":
            out.parent.mkdir(parents=True, exist_ok=True)  # --json needs an existing folder
        t0 = time.perf_counter()
        rc = cli.main(args)
        print(
            f"   {run['name']}: exit {rc} in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
