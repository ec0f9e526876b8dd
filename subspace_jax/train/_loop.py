"""One entry point, ``train_and_evaluate(config)``: N seeds trained together in one program.

The loop knows nothing of argument parsing, files or progress bars: it reports progress
through a callback and returns a JSON-serialisable result (the contract documented in the
README: ``model, dataset, projection, num_params, dim, val_accuracy, best_val_accuracy,
test_accuracy, step_time_ms, peak_memory_bytes, wall_time_s, seeds, history, per_seed``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from subspace_jax._checkpoint import load_params
from subspace_jax._subspace import (
    Layout,
    Subspace,
    check_finite,
    init_from_layout,
    init_trainable,
    make_layout,
)
from subspace_jax.data import Dataset, iterate_batches, load_dataset, num_batches
from subspace_jax.models import build_model
from subspace_jax.projections import SUBSPACE_BASE_LR, get_projection, lr_dim_factor
from subspace_jax.train._kinds import (
    default_lottery_every,
    direct_phase,
    lottery_snapshots,
    lottery_states,
)
from subspace_jax.train._metrics import median_ms, peak_memory_bytes
from subspace_jax.train._step import compile_steps

OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")
#: Default Adam learning rate of direct training (Li et al. 2018 / the Uber scripts).
DIRECT_LR = 1e-3
#: ``TrainConfig.projection`` value of the lottery subspace (Larsen et al. 2022): P from the
#: top singular directions of a direct-training trajectory. Not a registered projection: it is
#: applied as a stored ``orthogonal`` (``DenseState``) projection.
LOTTERY = "lottery"
#: The registered projection a lottery subspace is applied with (orthonormal, stored).
LOTTERY_APPLY = "orthogonal"

Progress = Callable[[dict], None]


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

    def to_dict(self) -> dict:
        """JSON-serialisable fields; the later subspace-kind fields only when not default.

        Leaving ``burn_in_steps``, ``said``, ``lottery_every`` and ``theta0_path`` out at their
        defaults keeps the dict of a plain run (and every hash of it, e.g. the sweep's
        ``config_key`` in existing ``runs.jsonl`` files) what it was before they existed.
        """
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        d["model_overrides"] = dict(self.model_overrides)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d


#: Fields added after the first release, with their defaults (see ``TrainConfig.to_dict``).
_LATER_FIELDS = {"burn_in_steps": 0, "said": False, "lottery_every": None, "theta0_path": None}


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
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {config.max_steps}")
    if isinstance(config.dim, bool) or not isinstance(config.dim, int) or config.dim < 0:
        raise ValueError(f"dim must be an integer >= 0 (0 = direct training), got {config.dim!r}")
    if not config.seeds:
        raise ValueError("at least one seed is needed")
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
    if config.dim == 0:
        for name, on in (
            ("burn_in_steps", b > 0),
            ("said", config.said),
            ("projection='lottery'", config.projection == LOTTERY),
        ):
            if on:
                raise ValueError(f"{name} needs a subspace: dim must be >= 1, got dim = 0")
    if b > 0 and config.projection == LOTTERY:
        raise ValueError(
            "burn_in_steps and projection='lottery' cannot be combined: the lottery subspace "
            "starts at the initialisation its trajectory started from"
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
    return load_dataset(
        config.dataset,
        config.data_dir,
        val_size=config.val_size,
        seed=config.data_seed,
        image_size=size,
    )


def config_layout(config: TrainConfig, params: Any) -> Layout:
    """The subspace layout of ``config`` over a parameter tree (or its shapes).

    A lottery subspace is laid out as a stored ``orthogonal`` projection (``LOTTERY_APPLY``).
    """
    projection = LOTTERY_APPLY if config.projection == LOTTERY else config.projection
    return make_layout(
        params, config.dim, projection=projection, per_leaf=config.per_layer, said=config.said
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


def _evaluate(eval_step, subs, trainables, x, y, chunk=1000):
    n = len(x)
    loss = 0.0
    correct = 0.0
    for start in range(0, n, chunk):
        l_sum, c = eval_step(subs, trainables, x[start : start + chunk], y[start : start + chunk])
        loss = loss + l_sum
        correct = correct + c.astype(jnp.float32)  # int32 counts, summed as float32
    loss, correct = jax.device_get((loss, correct))
    return np.asarray(loss) / n, np.asarray(correct) / n


def train_and_evaluate(
    config: TrainConfig,
    data: Dataset | None = None,
    *,
    progress: Progress | None = None,
    theta0_fn: Callable[[jax.Array], Any] | None = None,
    return_state: bool = False,
) -> dict | tuple[dict, Trained]:
    """Train ``len(config.seeds)`` runs together and evaluate them.

    Args:
      config: the run's :class:`TrainConfig`.
      data: a loaded :class:`Dataset` (loaded from the config when None).
      progress: called with ``{"event": "step"|"epoch", ...}`` dicts while training.
      theta0_fn: optional ``key -> params`` replacing the model's own initialisation (e.g. a
        pretrained checkpoint for subspace fine-tuning).
      return_state: also return the :class:`Trained` state.

    Returns:
      The result dict (see module docstring); accuracies are means over seeds, ``per_seed``
      holds each seed's.
    """
    validate_config(config)
    t_start = time.perf_counter()
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
    data_shape = tuple(int(s) for s in data.x_train.shape[1:])
    model = build_model(config.model, data_shape, data.num_classes, **dict(config.model_overrides))
    if theta0_fn is None and config.theta0_path is not None:
        theta0_fn = checkpoint_init(config.theta0_path, model)
    if theta0_fn is not None:
        model = model._replace(init=theta0_fn)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    layout = config_layout(config, shapes)
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
    lr = resolve_lr(config, layout)
    optimizer = make_optimizer(config.optimizer, lr)
    train_step, eval_step = compile_steps(model.apply, optimizer, config.l2)

    keys = run_keys(config.seeds)
    t_init = time.perf_counter()
    if config.burn_in_steps > 0 or config.projection == LOTTERY:
        subs = _init_with_direct_phase(
            config, model, layout, keys, data, total_steps, lottery_every, progress
        )
    else:
        subs = init_runs(config, model, layout, keys)
    check_finite(subs, seeds=config.seeds)
    trainables = jax.vmap(init_trainable)(subs)
    # Copy: directly trained leaves are donated to the step and must not alias theta0.
    trainables = jax.tree_util.tree_map(jnp.copy, trainables)
    opt_states = jax.vmap(optimizer.init)(trainables)
    jax.block_until_ready((subs, trainables, opt_states))
    setup_s = time.perf_counter() - t_init

    history = []
    step_times: list[float] = []
    best_val = np.full(len(config.seeds), -np.inf)
    step = 0
    for epoch in range(config.epochs):
        if step >= total_steps:
            break
        t_epoch = time.perf_counter()
        losses, accs = [], []
        for xb, yb in iterate_batches(
            data.x_train, data.y_train, config.batch_size, seed=config.data_seed, epoch=epoch
        ):
            if step >= total_steps:
                break
            t = time.perf_counter()
            trainables, opt_states, loss, acc = train_step(subs, trainables, opt_states, xb, yb)
            loss.block_until_ready()
            if step > 0:  # the first call compiles
                step_times.append(time.perf_counter() - t)
            losses.append(loss)
            accs.append(acc)
            step += 1
            if progress is not None:
                progress(
                    {"event": "step", "step": step, "total_steps": total_steps, "epoch": epoch}
                )
        train_loss = np.mean(np.stack(jax.device_get(losses)), axis=0)
        train_acc = np.mean(np.stack(jax.device_get(accs)), axis=0)
        val_loss, val_acc = _evaluate(eval_step, subs, trainables, data.x_val, data.y_val)
        best_val = np.maximum(best_val, val_acc)
        record = {
            "epoch": epoch + 1,
            "steps": step,
            "train_loss": float(np.mean(train_loss)),
            "train_accuracy": float(np.mean(train_acc)),
            "val_loss": float(np.mean(val_loss)),
            "val_accuracy": float(np.mean(val_acc)),
            "per_seed_val_accuracy": [float(a) for a in val_acc],
            "per_seed_val_loss": [float(a) for a in val_loss],
            "per_seed_train_loss": [float(a) for a in train_loss],
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        history.append(record)
        if progress is not None:
            progress({"event": "epoch", **record})

    test_loss, test_acc = _evaluate(eval_step, subs, trainables, data.x_test, data.y_test)
    final_val = np.asarray(history[-1]["per_seed_val_accuracy"])
    per_seed = [
        {
            "seed": int(s),
            "val_accuracy": float(final_val[i]),
            "best_val_accuracy": float(best_val[i]),
            "test_accuracy": float(test_acc[i]),
            "test_loss": float(test_loss[i]),
        }
        for i, s in enumerate(config.seeds)
    ]
    result = {
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
        "val_accuracy": float(np.mean(final_val)),
        "best_val_accuracy": float(np.mean(best_val)),
        "test_accuracy": float(np.mean(test_acc)),
        "test_loss": float(np.mean(test_loss)),
        "step_time_ms": median_ms(step_times),
        "peak_memory_bytes": peak_memory_bytes(),
        "setup_time_s": setup_s,
        "wall_time_s": time.perf_counter() - t_start,
        "learning_rate": lr,
        "steps": step,
        "seeds": [int(s) for s in config.seeds],
        "per_seed": per_seed,
        "history": history,
        "data_source": data.source,
        "config": config.to_dict(),
        "backend": jax.default_backend(),
    }
    if return_state:
        return result, Trained(model, subs, trainables)
    return result


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


class Trained(NamedTuple):
    """What a run trained: the model and, batched over seeds, the subspaces and variables."""

    model: Any
    subs: Subspace
    trainables: dict
