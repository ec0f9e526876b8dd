"""One entry point, ``train_and_evaluate(config)``: N seeds trained together in one program.

The loop knows nothing of argument parsing or progress bars: it reports progress through a
callback and returns ``TrainOutput(result, trained)``, ``result`` a JSON-serialisable dict (the
contract documented in the README: ``model, dataset, projection, num_params, dim,
val_accuracy, best_val_accuracy, test_accuracy, step_time_ms, peak_memory_bytes, wall_time_s,
seeds, history, per_seed, diverged, diverged_seeds``). The steps: :func:`setup_run` (model,
layout, schedule, data placement), ``_train_seeds`` (initialise, then the epochs of
:mod:`~subspace_jax.train._epochs`, each in chunks of steps run as one ``lax.scan``) and
``_result``. With ``checkpoint`` it saves and resumes its state (:mod:`._resume`).

Divergence: the training step is guarded (:func:`~subspace_jax.train.guard_finite`), so a seed
whose loss or state becomes non-finite stops updating at that step while the other seeds go on;
the flags stay on the device and are read once an epoch. A diverged seed keeps its numbers (of
its last finite state) in ``per_seed`` and ``history``, flagged, and is left out of every mean.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_jax import sharding
from subspace_jax._checkpoint import load_params
from subspace_jax._errors import UserError
from subspace_jax._subspace import (
    Layout,
    Subspace,
    check_finite,
    init_from_layout,
    make_layout,
)
from subspace_jax.data import Dataset, data_fingerprint, load_dataset, num_batches
from subspace_jax.data._classes import select_classes
from subspace_jax.models import build_model, classifier_path
from subspace_jax.projections import SUBSPACE_BASE_LR, get_projection, lr_dim_factor
from subspace_jax.train import _resume
from subspace_jax.train._augment import augment_key, augment_step
from subspace_jax.train._epochs import (
    Loop,
    LoopState,
    Placed,
    chunk_steps,
    compile_loop_chunk,
    epoch_record,
    evaluate,
    first_state,
    live_mean,
    place_data,
    run_epochs,
)
from subspace_jax.train._kinds import (
    default_lottery_every,
    direct_phase,
    lottery_snapshots,
    lottery_states,
)
from subspace_jax.train._metrics import median_ms, peak_memory_bytes
from subspace_jax.train._resume import (
    ORBAX_MISSING,
    CheckpointOptions,
    GroupCheckpointer,
    run_directory,
    run_key,
)
from subspace_jax.train._step import (
    compile_chunk,
    init_divergence,
    init_train_vars,
    loops_on_host,
    make_eval_step,
    over_seeds,
    split_state,
)
from subspace_jax.train._tasks import (
    checkpoint_without_head,
    head_labels,
    model_init_with_fresh_head,
    with_direct_lr,
)

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")
#: Default Adam learning rate of direct training (Li et al. 2018 / the Uber scripts).
DIRECT_LR = 1e-3
#: ``TrainConfig.projection`` value of the lottery subspace (Larsen et al. 2022): P from the
#: top singular directions of a direct-training trajectory. Not a registered projection: it is
#: applied as a stored ``orthogonal`` (``DenseState``) projection.
LOTTERY = "lottery"
#: The registered projection a lottery subspace is applied with (orthonormal, stored).
LOTTERY_APPLY = "orthogonal"

#: What to do with a seed that diverged: ``stop`` keeps its last finite state and flags it;
#: ``retry`` trains it again from scratch at the learning rate divided by ``RETRY_LR_FACTOR``
#: (again for each retry), at most ``TrainConfig.max_retries`` times.
ON_DIVERGENCE = ("stop", "retry")
RETRY_LR_FACTOR = 10.0

Progress = Callable[[dict], None]
#: Largest seed: ``jax.random.key`` keeps 32 bits of it (2**32 would give the key of seed 0).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (JSON-serialisable via ``asdict``).

    Attributes:
      model: model name (``subspace_jax.models.MODELS``).
      dataset: dataset name (``subspace_jax.data.DATASETS``); ``digits`` is the offline default.
      data_dir: folder with the dataset's standard files, or None.
      dim: subspace dimension d; 0 trains the model directly.
      projection: projection name.
      per_layer: one projection per parameter leaf, d split in proportion to leaf size.
      optimizer: one of ``OPTIMIZERS``.
      lr: learning rate; None picks the default (``DIRECT_LR`` direct,
        ``SUBSPACE_BASE_LR / E||column||`` in a subspace).
      epochs: passes over the training split.
      batch_size: examples per step (the same batches for every seed).
      seeds: one run per seed (model init and projection), trained together under vmap.
      l2: weight of ``0.5 ||theta||^2`` in the loss.
      val_size: validation examples carved from the training set (None: dataset default).
      image_size: None keeps the model's default input size (see ``default_image_size``).
      max_steps: stop after this many steps in total (None: run all epochs).
      data_seed: seed of the batch order and of the validation split.
      model_overrides: keyword overrides for ``build_model``.
      burn_in_steps: train directly for this many steps (optimizer ``optimizer`` at the direct
        learning rate ``DIRECT_LR``, the main loop's batches), then draw the random subspace
        through the burned-in point. 0: no burn-in.
      said: SAID (Aghajanyan et al. 2021): one learned scale per projected leaf; ``dim`` counts
        the scales (``w`` has ``dim - m`` entries; the result reports ``said_scales = m``).
      lottery_every: with ``projection="lottery"``, record the parameters every this many
        steps (None: about ``2 dim + 1`` points over the run).
      theta0_path: a parameter checkpoint (``.msgpack`` or ``.npz``) used as theta0 for every
        seed (subspace fine-tuning); None: the model's own initialisation.
      on_divergence: ``"stop"`` or ``"retry"`` (see ``ON_DIVERGENCE``).
      max_retries: with ``on_divergence="retry"``, retries per diverged seed (>= 0).
      augment: standard CIFAR augmentation of every training batch (pad-4 random crop and
        horizontal flip, on the device, from ``data_seed`` and the step:
        ``subspace_jax.train._augment``).
      classes: keep only these labels of the dataset, relabelled ``0..k-1`` in this order
        (None: every class); see ``subspace_jax.data.select_classes``.
      reinit_head: draw the classifier layer afresh (each seed's own ``model.init``) instead of
        taking it from ``theta0_path``, and train it directly beside the subspace at the direct
        learning rate; ``dim`` counts only the subspace.
    """

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    dim: int = 0
    projection: str = "dense"
    per_layer: bool = False
    optimizer: str = "adam"
    lr: float | None = None
    epochs: int = 10
    batch_size: int = 128
    seeds: tuple[int, ...] = (0,)
    l2: float = 0.0
    val_size: int | None = None
    image_size: int | None = None
    max_steps: int | None = None
    data_seed: int = 0
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    burn_in_steps: int = 0
    said: bool = False
    lottery_every: int | None = None
    theta0_path: str | None = None
    on_divergence: str = "stop"
    max_retries: int = 2
    augment: bool = False
    classes: tuple[int, ...] | None = None
    reinit_head: bool = False

    def to_dict(self) -> dict:
        """JSON-serialisable fields; the fields added later only when not default.

        Leaving ``burn_in_steps``, ``said``, ``lottery_every``, ``theta0_path``,
        ``on_divergence``, ``max_retries``, ``augment``, ``classes`` and ``reinit_head`` out at
        their defaults keeps the dict of a plain run (and every hash of it, e.g. the sweep's
        ``config_key`` in existing ``runs.jsonl`` files) what it was before they existed.
        """
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        d["model_overrides"] = dict(self.model_overrides)
        if d["classes"] is not None:
            d["classes"] = list(d["classes"])
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d


#: Fields added after the first release, with their defaults (see ``TrainConfig.to_dict``).
_LATER_FIELDS = {
    "burn_in_steps": 0,
    "said": False,
    "lottery_every": None,
    "theta0_path": None,
    "on_divergence": "stop",
    "max_retries": 2,
    "augment": False,
    "classes": None,
    "reinit_head": False,
}


def validate_config(config: TrainConfig) -> None:
    """Reject bad values before any data is read or anything is compiled."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {config.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
        )
    if config.lr is not None and (not math.isfinite(config.lr) or config.lr <= 0):
        raise ValueError(f"learning rate must be a finite number > 0, got {config.lr}")
    if not math.isfinite(config.l2) or config.l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {config.l2}")
    for name, v, lo in (("epochs", config.epochs, 1), ("batch_size", config.batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if config.val_size is not None and (
        isinstance(config.val_size, bool) or not isinstance(config.val_size, int)
    ):
        raise ValueError(f"val_size must be an integer or None, got {config.val_size!r}")
    if config.val_size is not None and config.val_size < 1:
        raise ValueError(
            f"val_size must be >= 1 (the validation accuracy is the reported metric), "
            f"got {config.val_size}"
        )
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {config.max_steps}")
    if isinstance(config.dim, bool) or not isinstance(config.dim, int) or config.dim < 0:
        raise ValueError(f"dim must be an integer >= 0 (0 = direct training), got {config.dim!r}")
    if not config.seeds:
        raise ValueError("at least one seed is needed")
    for seed in config.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(
                f"seed {seed!r} is not a PRNG seed: seeds must be integers in 0..{MAX_SEED}"
            )
    ds = config.data_seed
    if isinstance(ds, bool) or not isinstance(ds, int) or not 0 <= ds <= MAX_SEED:
        raise ValueError(f"data_seed must be an integer in 0..{MAX_SEED}, got {ds!r}")
    if len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct, got {list(config.seeds)}")
    if config.projection != LOTTERY:
        get_projection(config.projection)
    b = config.burn_in_steps
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ValueError(f"burn_in_steps must be an integer >= 0, got {b!r}")
    k = config.lottery_every
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"lottery_every must be an integer >= 1 (or None), got {k!r}")
    if config.on_divergence not in ON_DIVERGENCE:
        raise ValueError(
            f"unknown on_divergence {config.on_divergence!r}; choose one of: "
            f"{', '.join(ON_DIVERGENCE)}"
        )
    r = config.max_retries
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"max_retries must be an integer >= 0, got {r!r}")
    if config.dim == 0:
        for name, on in (
            ("burn_in_steps", b > 0),
            ("said", config.said),
            ("projection='lottery'", config.projection == LOTTERY),
        ):
            if on:
                raise ValueError(f"{name} needs a subspace: dim must be >= 1, got dim = 0")
    _validate_task(config)
    if b > 0 and config.projection == LOTTERY:
        raise ValueError(
            "burn_in_steps and projection='lottery' cannot be combined: the lottery subspace "
            "starts at the initialisation its trajectory started from"
        )


def _validate_task(config: TrainConfig) -> None:
    """``augment``, ``classes`` and ``reinit_head``."""
    if not isinstance(config.augment, bool) or not isinstance(config.reinit_head, bool):
        raise UserError("augment and reinit_head must be booleans")
    c = config.classes
    if c is not None:
        if (
            isinstance(c, (str, bytes))
            or len(c) < 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in c)
            or len(set(c)) != len(c)
        ):
            raise UserError(f"classes must be at least 2 distinct labels >= 0, got {c!r}")


def check_data_fits(config: TrainConfig, data: Dataset) -> None:
    """Reject a config the loaded data cannot serve: a batch larger than the training split,
    or an empty validation split (the validation accuracy is what every command reports).

    Raises:
      ValueError: naming the sizes.
    """
    n_train, n_val = len(data.y_train), len(data.y_val)
    if config.batch_size > n_train:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the training split "
            f"({n_train} examples of {data.name} after carving {n_val} for validation): "
            f"use a batch size <= {n_train}"
        )
    if n_val == 0:
        raise ValueError(
            f"the validation split of {data.name} is empty: the validation accuracy is the "
            "reported metric, so at least 1 validation example is needed (--val-size >= 1)"
        )


def default_image_size(model: str, dataset: str) -> int | None:
    """The seed report's input sizes: CIFAR-10 at 28x28x3 for the MLPs, native otherwise."""
    if model.startswith("mlp") and dataset == "cifar10":
        return 28
    return None


#: Input shapes (H, W, C) of the datasets at their native size.
NATIVE_SHAPES = {
    "digits": (28, 28, 1),
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
}


def input_shape(model: str, dataset: str, image_size: int | None = None) -> tuple[int, int, int]:
    """The ``(H, W, C)`` input of ``model`` on ``dataset`` as :func:`load_data` prepares it.

    Raises:
      ValueError: for an unknown dataset.
    """
    if dataset not in NATIVE_SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(NATIVE_SHAPES)}")
    h, w, c = NATIVE_SHAPES[dataset]
    size = image_size or default_image_size(model, dataset)
    if size:
        h = w = size
    return (h, w, c)


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=0.9)
    return optax.sgd(lr)


def resolve_lr(config: TrainConfig, layout: Layout) -> float:
    """The learning rate actually used (the explicit one, or the documented default)."""
    if config.lr is not None:
        return float(config.lr)
    if config.dim == 0:
        return DIRECT_LR
    proj = get_projection(config.projection if config.projection != LOTTERY else LOTTERY_APPLY)
    # Groups of one subspace share a projection; weight the column norm by group dimension.
    norms = [proj.column_norm(g.size, g.dim) for g in layout.groups]
    dims = [g.dim for g in layout.groups]
    norm = float(np.exp(np.average(np.log(norms), weights=dims)))
    return SUBSPACE_BASE_LR / norm * lr_dim_factor(layout.dim)


def load_data(config: TrainConfig) -> Dataset:
    size = config.image_size or default_image_size(config.model, config.dataset)
    data = load_dataset(
        config.dataset,
        config.data_dir,
        val_size=config.val_size,
        seed=config.data_seed,
        image_size=size,
    )
    return select_classes(data, config.classes) if config.classes is not None else data


def config_layout(config: TrainConfig, params: Any) -> Layout:
    """The subspace layout of ``config`` over a parameter tree (or its shapes).

    A lottery subspace is laid out as a stored ``orthogonal`` projection (``LOTTERY_APPLY``).
    """
    projection = LOTTERY_APPLY if config.projection == LOTTERY else config.projection
    labels = None
    if config.reinit_head and config.dim:  # the classifier is trained directly (d excludes it)
        labels = head_labels(classifier_path(config.model, config.model_overrides))
    return make_layout(
        params,
        config.dim,
        projection=projection,
        per_leaf=config.per_layer,
        said=config.said,
        labels=labels,
    )


def checkpoint_init(path: str, model) -> Callable[[jax.Array], Any]:
    """``key -> params`` returning the checkpoint at ``path`` (checked against ``model``)."""
    params = load_params(path, jax.eval_shape(model.init, jax.random.key(0)))

    def init(key: jax.Array) -> Any:
        del key
        return params

    return init


def run_keys(seeds) -> jax.Array:
    """Typed PRNG keys ``jax.random.key(s)`` stacked over seeds, shape ``(N,)``."""
    keys = jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds])
    return jax.random.wrap_key_data(keys)


def make_init_fn(model, layout: Layout) -> Callable[[jax.Array], Subspace]:
    """The jitted ``keys (N,) -> N subspaces`` of :func:`init_runs` (reusable, compiled once).

    The key rule: ``k_model, k_proj = jax.random.split(key)``; ``theta0 = model.init(k_model)``;
    the projections are drawn from ``k_proj`` (:func:`~subspace_jax.init_from_layout`).
    """

    def one(key):
        k_model, k_proj = jax.random.split(key)
        return init_from_layout(k_proj, model.init(k_model), layout)

    return jax.jit(jax.vmap(one))


def init_runs(config: TrainConfig, model, layout: Layout, keys: jax.Array) -> Subspace:
    """Initialise N subspaces (one per key) in one vmapped call: theta0 from the model's init."""
    return make_init_fn(model, layout)(keys)


class Trained(NamedTuple):
    """What a run trained: the model and, batched over seeds, the subspaces and variables."""

    model: Any
    subs: Subspace
    trainables: Any  # Trainable, or TrainVars(Trainable, state) for a model with state


class Setup(NamedTuple):
    """What every group of seeds of a run shares: built once by :func:`setup_run`.

    Attributes:
      config: the run's config.
      model: the model (its ``init`` replaced by ``theta0_fn`` or the checkpoint's).
      theta0_fn: the ``key -> params`` override of the model's init, or None.
      layout: the subspace layout.
      data: the dataset (host arrays).
      placed: where the loop reads the data (:func:`~subspace_jax.train._epochs.place_data`).
      total_steps: steps of the run.
      lottery_every: the lottery subspace's recording interval, or None.
      lr: the learning rate (before any retry).
      chunk_len: steps per chunk.
    """

    config: TrainConfig
    model: Any
    theta0_fn: Any
    layout: Layout
    data: Dataset
    placed: Placed
    total_steps: int
    lottery_every: int | None
    lr: float
    chunk_len: int


class TrainOutput(NamedTuple):
    """What :func:`train_and_evaluate` returns: ``result, trained = train_and_evaluate(...)``.

    Attributes:
      result: the JSON-serialisable result dict (see the module docstring).
      trained: the :class:`Trained` state (model, subspaces and variables, batched over seeds).
    """

    result: dict
    trained: Trained


def train_and_evaluate(
    config: TrainConfig,
    data: Dataset | None = None,
    *,
    progress: Progress | None = None,
    theta0_fn: Callable[[jax.Array], Any] | None = None,
    checkpoint: CheckpointOptions | None = None,
    mesh: sharding.Mesh | sharding.MeshPlan | None = None,
) -> TrainOutput:
    """Train ``len(config.seeds)`` runs together and evaluate them.

    A seed whose loss, trainable variables or optimiser state becomes non-finite stops
    updating at that step (the others go on) and is reported as diverged; with
    ``config.on_divergence == "retry"`` it is trained again from scratch with the learning rate
    divided by ``RETRY_LR_FACTOR``, at most ``config.max_retries`` times.

    Args:
      config: the run's :class:`TrainConfig`.
      data: a loaded :class:`Dataset` (loaded from the config when None).
      progress: called with ``{"event": "step"|"epoch"|"diverged"|"message", ...}`` dicts
        while training; ``step`` events come once a chunk of steps (see ``_epochs``).
      theta0_fn: optional ``key -> params`` replacing the model's own initialisation (e.g. a
        pretrained checkpoint for subspace fine-tuning).
      checkpoint: checkpoint the training state with orbax (see ``_resume``) and resume from
        the latest complete checkpoint of the same run; the caller removes the checkpoints
        (:func:`remove_checkpoints`) once it has written the result. Ignored, with a warning,
        when orbax is not installed.
      mesh: a ``jax.sharding.Mesh`` or :class:`~subspace_jax.sharding.MeshPlan` to train on
        (seeds, batch and parameters spread over its devices); None: the default plan
        (:func:`subspace_jax.sharding.use_plan`, set by the CLI), else one device.

    Returns:
      A :class:`TrainOutput` ``(result, trained)``. ``result`` is the result dict (see module
      docstring); accuracies are means over the seeds that did not diverge (None when every
      seed diverged), ``per_seed`` holds each seed's with its ``diverged``, ``diverged_step``
      (1-based), ``learning_rate`` and ``retries``.
    """
    validate_config(config)
    t_start = time.perf_counter()
    run_mesh = sharding.resolve_mesh(mesh, len(config.seeds), config.batch_size)
    # On a mesh the loop feeds batches from the host: no copy of the data on one device.
    setup = setup_run(config, data, theta0_fn, place=run_mesh is None)
    if checkpoint is not None and not _resume.available():
        warnings.warn(ORBAX_MISSING, stacklevel=2)
        checkpoint = None

    def train(seeds, lr, retries):
        saver = None
        if checkpoint is not None:
            folder = run_directory(checkpoint, config, setup.data) / f"group-{retries}"
            per_epoch = num_batches(len(setup.data.x_train), config.batch_size, True)
            saver = GroupCheckpointer(folder, checkpoint, run_key(config, setup.data), per_epoch)
        return _train_seeds(setup, tuple(seeds), lr, retries, progress, saver, mesh)

    runs = train(config.seeds, setup.lr, 0)
    if config.on_divergence == "retry":
        runs = _retry_diverged(runs, setup.lr, config.max_retries, train, progress)
    result = _result(config, setup.layout, setup.data, setup.theta0_fn, setup.lr, runs, t_start)
    result.update(_devices_record(run_mesh))
    return TrainOutput(result, Trained(setup.model, runs.subs, runs.trainables))


def setup_run(
    config: TrainConfig, data: Dataset | None, theta0_fn=None, *, place: bool = True
) -> Setup:
    """Check the config against the model, load the data and (``place``) copy it to the
    device when it fits, fix the schedule."""
    if data is None:
        # Check the model and the subspace's sizes before reading (possibly large) data.
        expected = build_model(
            config.model,
            input_shape(config.model, config.dataset, config.image_size),
            10,
            **dict(config.model_overrides),
        )
        config_layout(config, jax.eval_shape(expected.init, jax.random.key(0)))
        data = load_data(config)
    check_data_fits(config, data)
    model, theta0_fn = _build_model(config, data, theta0_fn)
    layout = config_layout(config, jax.eval_shape(model.init, jax.random.key(0)))
    total_steps, lottery_every = _schedule(config, data, layout)
    per_epoch = num_batches(len(data.x_train), config.batch_size, True)
    return Setup(
        config=config,
        model=model,
        theta0_fn=theta0_fn,
        layout=layout,
        data=data,
        placed=place_data(data) if place else place_data(data, limit=0),
        total_steps=total_steps,
        lottery_every=lottery_every,
        lr=resolve_lr(config, layout),
        chunk_len=chunk_steps(per_epoch, total_steps),
    )


def _build_model(config: TrainConfig, data: Dataset, theta0_fn):
    """The model for ``data``'s input shape, with theta0 from ``theta0_fn`` or the checkpoint."""
    data_shape = tuple(int(s) for s in data.x_train.shape[1:])
    model = build_model(config.model, data_shape, data.num_classes, **dict(config.model_overrides))
    if model.state_collections and (config.burn_in_steps or config.projection == LOTTERY):
        raise UserError(
            f"model {config.model!r} keeps BatchNorm statistics: burn-in and lottery subspaces "
            "are not supported for models with state yet"
        )
    if theta0_fn is None and config.theta0_path is not None:
        if config.reinit_head:
            theta0_fn = checkpoint_without_head(config.theta0_path, model)
        else:
            theta0_fn = checkpoint_init(config.theta0_path, model)
    elif theta0_fn is not None and config.reinit_head:
        theta0_fn = model_init_with_fresh_head(theta0_fn, model)
    if theta0_fn is not None:
        model = model._replace(init=theta0_fn)
    return model, theta0_fn


def _schedule(config: TrainConfig, data: Dataset, layout: Layout) -> tuple[int, int | None]:
    """``(total_steps, lottery_every)``; checks that a lottery trajectory has enough points."""
    steps_per_epoch = num_batches(len(data.x_train), config.batch_size, True)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    lottery_every = None
    if config.projection == LOTTERY:
        lottery_every = config.lottery_every or default_lottery_every(total_steps, layout.dim)
        points = lottery_snapshots(total_steps, lottery_every)
        need = max(g.dim for g in layout.groups)
        if points - 1 < need:
            raise ValueError(
                f"lottery subspace: {total_steps} steps recorded every {lottery_every} give "
                f"T = {points} points, whose centred trajectory has rank <= {points - 1} < "
                f"d = {need}; train for more steps, record more often or lower d"
            )
    return total_steps, lottery_every


#: The per-seed arrays of an epoch record in :class:`_Runs` (leading axis = seed).
_PER_SEED_EPOCH = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "diverged_at")


class _Runs(NamedTuple):
    """What training a group of seeds together produced (numpy arrays, leading axis = seed).

    ``epochs`` holds one dict per epoch: ``epoch``, ``steps``, ``epoch_time_s`` and the
    ``(N,)`` arrays named in ``_PER_SEED_EPOCH``. ``diverged_at``: the 1-based step at which
    each seed diverged, 0 for a seed that stayed finite.
    """

    seeds: tuple[int, ...]
    learning_rates: np.ndarray  # (N,) float
    retries: np.ndarray  # (N,) int
    epochs: list[dict]
    best_val: np.ndarray  # (N,) float64
    test_loss: np.ndarray  # (N,)
    test_acc: np.ndarray  # (N,)
    diverged_at: np.ndarray  # (N,) int
    step_times: list[float]
    setup_s: float
    steps: int
    subs: Subspace
    trainables: Any


def _loops_on_host(setup: Setup) -> bool:
    """:func:`~subspace_jax.train.loops_on_host` for the run's model and one batch."""
    x = setup.data.x_train
    batch = jax.ShapeDtypeStruct((setup.config.batch_size, *x.shape[1:]), x.dtype)
    return loops_on_host(
        setup.model.apply, jax.eval_shape(setup.model.init, jax.random.key(0)), batch
    )


def _train_seeds(
    setup: Setup,
    seeds: tuple[int, ...],
    lr: float,
    retries: int,
    progress: Progress | None,
    saver: GroupCheckpointer | None = None,
    mesh=None,
) -> _Runs:
    """Train ``seeds`` together at learning rate ``lr`` and evaluate them; with ``saver``,
    resume from its latest checkpoint and checkpoint while training; with ``mesh``, on its
    devices (:mod:`subspace_jax.sharding`)."""
    config = dataclasses.replace(setup.config, seeds=seeds)
    mesh = sharding.resolve_mesh(mesh, len(seeds), config.batch_size)
    optimizer = make_optimizer(config.optimizer, lr)
    if config.reinit_head and config.dim:  # the classifier at the direct learning rate
        optimizer = with_direct_lr(make_optimizer, config.optimizer, lr, DIRECT_LR)
    t_init = time.perf_counter()
    subs, state = _init_state(setup, config, optimizer, progress)
    if saver is not None:
        state = _resume_from(saver, state, setup.total_steps, seeds, progress)
    subs, state, placed = _place_on_mesh(mesh, subs, state, setup)
    setup_s = time.perf_counter() - t_init
    host = mesh is None and _loops_on_host(setup)
    chunk_fn = compile_chunk(
        setup.model.apply,
        optimizer,
        config.l2,
        gather=placed.on_device,
        augment=_augmenter(config),
        host_loop=host,
    )
    eval_fn = over_seeds(make_eval_step(setup.model.apply), (0, 0, None, None), unroll=host)
    loop = Loop(
        # On a mesh the chunk stays jitted (compiled at its first call for the placements).
        chunk=chunk_fn
        if mesh is not None
        else compile_loop_chunk(
            chunk_fn, subs, state, placed, setup.data, setup.chunk_len, config.batch_size
        ),
        eval_step=jax.jit(eval_fn),
        subs=subs,
        placed=placed,
        data=setup.data,
        batch_size=config.batch_size,
        data_seed=config.data_seed,
        epochs=config.epochs,
        total_steps=setup.total_steps,
        chunk_len=setup.chunk_len,
        seeds=seeds,
        lr=lr,
        mesh=mesh,
    )
    try:
        state = run_epochs(loop, state, progress, on_chunk=saver)
    finally:
        if saver is not None:
            saver.close()
    test_loss, test_acc = evaluate(loop.eval_step, subs, state.trainables, *placed.test, mesh=mesh)
    return _Runs(
        seeds=tuple(int(s) for s in seeds),
        learning_rates=np.full(len(seeds), lr),
        retries=np.full(len(seeds), retries),
        epochs=state.epochs,
        best_val=state.best_val,
        test_loss=test_loss,
        test_acc=test_acc,
        diverged_at=np.asarray(state.epochs[-1]["diverged_at"]),
        step_times=state.step_times,
        setup_s=setup_s,
        steps=state.step,
        subs=subs,
        trainables=state.trainables,
    )


def _augmenter(config: TrainConfig):
    """``augment(step, xb)`` of the scan body (``config.augment``), or None."""
    if not config.augment:
        return None
    key = augment_key(config.data_seed)
    return lambda step, xb: augment_step(key, step, xb)


def _place_on_mesh(mesh, subs, state: LoopState, setup: Setup) -> tuple:
    """``(subs, state, placed)`` on ``mesh``'s devices: the state along seeds (and params),
    the batches fed from the host along ``"data"``; unchanged without a mesh."""
    if mesh is None:
        return subs, state, setup.placed
    subs, trainables, opt_states, divs = sharding.place_state(
        mesh, subs, state.trainables, state.opt_states, state.divs
    )
    state = state._replace(trainables=trainables, opt_states=opt_states, divs=divs)
    data = setup.data
    placed = Placed(False, (), (data.x_val, data.y_val), (data.x_test, data.y_test))
    return subs, state, placed


def _resume_from(saver: GroupCheckpointer, state, total_steps: int, seeds, progress):
    """``state`` advanced to the saver's latest checkpoint (if any), announced."""
    state = saver.restore(state)
    if state.step and progress is not None:
        progress(
            {
                "event": "message",
                "text": f"resuming seeds {list(seeds)} from the checkpoint at step "
                f"{state.step} of {total_steps} (epoch {state.epoch + 1}, "
                f"step {state.epoch_step} of it)",
            }
        )
    return state


def _init_state(setup: Setup, config: TrainConfig, optimizer, progress) -> tuple:
    """``(subs, first LoopState)`` of ``config.seeds``: subspaces, variables, optimiser."""
    keys = run_keys(config.seeds)
    if config.burn_in_steps > 0 or config.projection == LOTTERY:
        subs = _init_with_direct_phase(
            config,
            setup.model,
            setup.layout,
            keys,
            setup.data,
            setup.total_steps,
            setup.lottery_every,
            progress,
        )
    else:
        subs = init_runs(config, setup.model, setup.layout, keys)
    check_finite(subs, seeds=config.seeds)
    # Fresh copies (the step donates them), with the model's state (BatchNorm), if any: the
    # optimiser sees only the Trainable.
    trainables = jax.vmap(init_train_vars)(subs)
    opt_states = jax.vmap(optimizer.init)(split_state(trainables)[0])
    n = len(config.seeds)
    divs = jax.tree_util.tree_map(lambda x: jnp.zeros((n,), x.dtype), init_divergence())
    jax.block_until_ready((subs, trainables, opt_states, divs))
    return subs, first_state(trainables, opt_states, divs, n)


def _retry_diverged(runs: _Runs, lr: float, max_retries: int, train, progress) -> _Runs:
    """Train the diverged seeds again from scratch at ``lr / RETRY_LR_FACTOR ** k``, k = 1, 2..

    ``train(seeds, lr, retries) -> _Runs`` trains a group of seeds; the retried seeds' records
    and trainable variables replace theirs in ``runs`` (their subspaces are the same: they
    depend only on the seed).
    """
    for attempt in range(1, max_retries + 1):
        todo = np.flatnonzero(runs.diverged_at > 0)
        if not todo.size:
            break
        seeds = [runs.seeds[i] for i in todo]
        lower = lr / RETRY_LR_FACTOR**attempt
        if progress is not None:
            progress(
                {
                    "event": "message",
                    "text": f"retrying seeds {seeds} from scratch with learning rate "
                    f"{lower:g} (retry {attempt} of {max_retries})",
                }
            )
        runs = _replace_seeds(runs, todo, train(seeds, lower, attempt))
    return runs


def _replace_seeds(runs: _Runs, idx: np.ndarray, new: _Runs) -> _Runs:
    """``runs`` with the seeds at positions ``idx`` replaced by ``new`` (same epochs)."""

    def put(old, values):
        out = np.array(old, copy=True)
        out[idx] = values
        return out

    epochs = [
        {**e, **{k: put(e[k], f[k]) for k in _PER_SEED_EPOCH}}
        for e, f in zip(runs.epochs, new.epochs, strict=True)
    ]

    def set_rows(a, b):
        placed = getattr(a, "sharding", None)
        if placed is not None and len(placed.device_set) > 1:  # the runs' meshes may differ
            a, b = sharding.fetch((a, b))
            a = np.array(a, copy=True)
            a[idx] = b
            return a
        return a.at[idx].set(b)

    trainables = jax.tree_util.tree_map(set_rows, runs.trainables, new.trainables)
    # The retried seeds' own subspaces too: with burn-in, theta0 comes from the retry's direct
    # phase, and a compressed model must pair the retry's w with it.
    subs = jax.tree_util.tree_map(set_rows, runs.subs, new.subs)
    return runs._replace(
        learning_rates=put(runs.learning_rates, new.learning_rates),
        retries=put(runs.retries, new.retries),
        epochs=epochs,
        best_val=put(runs.best_val, new.best_val),
        test_loss=put(runs.test_loss, new.test_loss),
        test_acc=put(runs.test_acc, new.test_acc),
        diverged_at=put(runs.diverged_at, new.diverged_at),
        trainables=trainables,
        subs=subs,
    )


def _result(
    config: TrainConfig, layout: Layout, data: Dataset, theta0_fn, lr: float, runs: _Runs, t_start
) -> dict:
    """The JSON-serialisable result of a run that started at ``t_start`` (``perf_counter``)."""
    history = [epoch_record(raw) for raw in runs.epochs]
    final_val = np.asarray(history[-1]["per_seed_val_accuracy"])
    diverged = runs.diverged_at > 0
    per_seed = [
        {
            "seed": int(s),
            "val_accuracy": float(final_val[i]),
            "best_val_accuracy": float(runs.best_val[i]),
            "test_accuracy": float(runs.test_acc[i]),
            "test_loss": float(runs.test_loss[i]),
            "diverged": bool(diverged[i]),
            "diverged_step": int(runs.diverged_at[i]) if diverged[i] else None,
            "learning_rate": float(runs.learning_rates[i]),
            "retries": int(runs.retries[i]),
        }
        for i, s in enumerate(runs.seeds)
    ]
    return {
        "model": config.model,
        "dataset": config.dataset,
        "projection": config.projection if config.dim else "none",
        "num_params": int(layout.num_params),
        "dim": int(layout.total_dim),
        "w_dim": int(layout.dim),
        "said_scales": int(layout.num_scales),
        "per_layer": bool(config.per_layer),
        "theta0": _theta0_source(config, theta0_fn),
        "burn_in_steps": int(config.burn_in_steps),
        "val_accuracy": live_mean(final_val, diverged),
        "best_val_accuracy": live_mean(runs.best_val, diverged),
        "test_accuracy": live_mean(runs.test_acc, diverged),
        "test_loss": live_mean(runs.test_loss, diverged),
        "diverged": bool(diverged.any()),
        "diverged_seeds": [int(s) for s, d in zip(runs.seeds, diverged, strict=True) if d],
        "step_time_ms": median_ms(runs.step_times),
        "peak_memory_bytes": peak_memory_bytes(),
        "setup_time_s": runs.setup_s,
        "wall_time_s": time.perf_counter() - t_start,
        "learning_rate": lr,
        "steps": runs.steps,
        "seeds": [int(s) for s in config.seeds],
        "per_seed": per_seed,
        "history": history,
        "data_source": data.source,
        "data_fingerprint": data_fingerprint(data),
        "config": config.to_dict(),
        "backend": jax.default_backend(),
    }


def _devices_record(mesh) -> dict:
    """``devices``, ``processes`` and ``mesh`` of a run (``mesh`` None: one device)."""
    if mesh is None:
        return {"devices": 1, "processes": jax.process_count(), "mesh": dict(sharding.SINGLE)}
    return {
        "devices": int(mesh.devices.size),
        "processes": jax.process_count(),
        "mesh": sharding.mesh_shape(mesh),
    }


def _theta0_source(config: TrainConfig, theta0_fn) -> str:
    if config.theta0_path is not None:
        source = f"checkpoint:{config.theta0_path}"
    elif theta0_fn is not None:
        source = "theta0_fn"
    else:
        source = "init"
    return source + (f"+burn_in:{config.burn_in_steps}" if config.burn_in_steps else "")


def _init_with_direct_phase(
    config: TrainConfig,
    model,
    layout: Layout,
    keys: jax.Array,
    data: Dataset,
    total_steps: int,
    lottery_every: int | None,
    progress: Progress | None,
) -> Subspace:
    """Burn-in or lottery: direct training first, then the subspaces (batched over seeds)."""
    k_model, k_proj = jax.vmap(jax.random.split, out_axes=1)(keys)
    theta0 = jax.jit(jax.vmap(model.init))(k_model)
    lottery = config.projection == LOTTERY
    steps = total_steps if lottery else config.burn_in_steps
    what = "lottery trajectory" if lottery else "burn-in"
    if progress is not None:
        progress({"event": "message", "text": f"{what}: {steps} direct steps"})
    params, trajectory = direct_phase(
        model.apply,
        make_optimizer(config.optimizer, DIRECT_LR),
        theta0,
        data,
        num_steps=steps,
        batch_size=config.batch_size,
        data_seed=config.data_seed,
        l2=config.l2,
        record_every=lottery_every,
    )
    if lottery:
        return Subspace(
            theta0=theta0, proj_states=lottery_states(trajectory, layout), layout=layout
        )
    return jax.jit(jax.vmap(lambda k, th: init_from_layout(k, th, layout)))(k_proj, params)
