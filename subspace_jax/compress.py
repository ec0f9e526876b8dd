"""Compressed models: a trained subspace model stored as its key, its configs and ``w``.

A model trained in a random subspace is ``theta = theta0 + P w`` where ``theta0`` and ``P`` are
both derived from one seed: ``k_model, k_proj = jax.random.split(jax.random.key(seed))``,
``theta0 = model.init(k_model)`` and group g's projection is drawn from
``fold_in(k_proj, g)``. So the seed, the model and subspace configuration and the d numbers
``w`` are enough to rebuild every one of the model's D parameters, bit for bit on the same
platform (same JAX version and PRNG settings, same backend).

File format (one ``.npz``, written without pickle):

* ``header``: UTF-8 JSON as a ``uint8`` array: ``format``, ``version``, the ``seed`` and its
  ``key_rule``, the PRNG settings, the ``projection`` spec (name, per-layer, SAID, the groups'
  leaves and sizes), ``model_config`` (:attr:`~subspace_jax.models.ModelDef.config`),
  ``train_config`` (:meth:`~subspace_jax.train.TrainConfig.to_dict`), ``input_shape``,
  ``theta0_reproducible``, ``projection_reproducible``, the arrays ``stored``, ``notes``, and
  ``params_sha256`` (a digest of the trained parameters, checked on load).
* ``w``: float32 ``(d,)``; ``said``: float32 ``(m,)`` for SAID; ``direct_<j>``: directly
  trained leaves, if any.
* Only when they cannot be regenerated from the key: ``theta0_<j>`` (one per leaf: theta0 came
  from a checkpoint, a ``theta0_fn`` or a burn-in) and ``proj_<g>_<k>`` (the leaves of group g's
  projection state: a lottery subspace, whose P comes from a training trajectory). Such a file
  is no longer small (theta0 costs 4 D bytes, a lottery P 4 D d bytes), so
  :func:`save_compressed` refuses to write it unless ``allow_stored=True``.

Whether theta0 and P are reproducible is not taken on trust: :func:`save_compressed`
regenerates them from the key exactly as :func:`load_compressed` will and compares them bit for
bit with the trained ones; whatever differs is stored.

Example:
  >>> result, trained = train_and_evaluate(config, data, return_state=True)
  >>> save_compressed("model.npz", result, trained)
  >>> params, info = load_compressed("model.npz")
  >>> compressed_size_report("model.npz")["ratio"]  # full float32 bytes / file bytes
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax._checkpoint import load_params, save_params
from subspace_jax._subspace import Layout, Subspace, init_from_layout, to_params
from subspace_jax.models import from_config
from subspace_jax.projections import get_projection
from subspace_jax.train import (
    LOTTERY,
    TrainConfig,
    Trained,
    config_layout,
    load_data,
    make_init_fn,
    run_keys,
)

PyTree = Any

FORMAT = "subspace-jax-compressed"
VERSION = 1
KEY_RULE = (
    "k_model, k_proj = jax.random.split(jax.random.key(seed)); theta0 = model.init(k_model); "
    "projection of group g = init(jax.random.fold_in(k_proj, g), D_g, d_g); computed as "
    "subspace_jax.train.make_init_fn on a batch of one key"
)

__all__ = [
    "FORMAT",
    "KEY_RULE",
    "VERSION",
    "compressed_size_report",
    "evaluate_compressed",
    "load_compressed",
    "load_params",
    "save_compressed",
    "save_params",
    "train_config_from_dict",
]


# ------------------------------------------------------------------------------ helpers


def _prng_settings() -> dict:
    return {
        "impl": str(jax.config.jax_default_prng_impl),
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    }


def params_digest(params: PyTree) -> str:
    """SHA-256 of a parameter tree's leaves (flatten order, native bytes, with shapes)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _trees_equal(a: PyTree, b: PyTree) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        # Compare the bits (NaN-safe, -0.0 != 0.0).
        if x.tobytes() != y.tobytes():
            return False
    return True


def train_config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a :class:`~subspace_jax.train.TrainConfig` from :meth:`TrainConfig.to_dict`.

    Raises:
      ValueError: for fields this version does not know (a file from a newer version).
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"train config has fields this version of subspace-jax does not know: {unknown}"
        )
    kwargs = dict(d)
    if "seeds" in kwargs:
        kwargs["seeds"] = tuple(int(s) for s in kwargs["seeds"])
    if "model_overrides" in kwargs:
        kwargs["model_overrides"] = dict(kwargs["model_overrides"] or {})
    return TrainConfig(**kwargs)


@functools.lru_cache(maxsize=16)
def _init_fn(model_config_json: str, layout: Layout):
    """The training loop's own jitted initialisation (compiled once per model and layout)."""
    return make_init_fn(from_config(json.loads(model_config_json)), layout)


@functools.lru_cache(maxsize=16)
def _projection_fn(layout: Layout):
    """``(keys (N,), theta0) -> subspaces``: the projections of the key rule through theta0."""

    def one(key, theta0):
        _, k_proj = jax.random.split(key)
        return init_from_layout(k_proj, theta0, layout)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


_to_params = jax.jit(to_params)


def _regenerate(
    model_config: Mapping[str, Any],
    layout: Layout,
    seed: int,
    *,
    theta0: PyTree | None = None,
    proj_states: tuple | None = None,
) -> Subspace:
    """The seed's subspace rebuilt from the key (theta0 / projection states given if stored).

    Both saving (to check reproducibility) and loading go through this one function, so what
    the check accepts is exactly what the loader rebuilds.
    """
    keys = run_keys([seed])
    regen_layout = layout if proj_states is None else layout._replace(groups=())
    if theta0 is None:
        config_json = json.dumps(dict(model_config), sort_keys=True)
        sub = _init_fn(config_json, regen_layout)(keys)
    else:
        sub = _projection_fn(regen_layout)(keys, theta0)
    sub = jax.tree_util.tree_map(lambda x: x[0], sub)
    if proj_states is not None:
        sub = Subspace(theta0=sub.theta0, proj_states=tuple(proj_states), layout=layout)
    return sub


def _config_of(result_or_config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(result_or_config, TrainConfig):
        return result_or_config
    if isinstance(result_or_config, Mapping) and "config" in result_or_config:
        return train_config_from_dict(result_or_config["config"])
    raise ValueError(
        "result_or_config must be a TrainConfig or the result dict of train_and_evaluate "
        f"(with a 'config' entry), got {type(result_or_config).__name__}"
    )


def _layout_spec(layout: Layout) -> list[dict]:
    paths = layout.spec.paths
    return [
        {
            "leaves": [paths[i] for i in g.leaves],
            "size": int(g.size),
            "dim": int(g.dim),
            "offset": int(g.offset),
            "projection": g.projection,
        }
        for g in layout.groups
    ]


# ------------------------------------------------------------------------------ public API


def _check_not_diverged(result_or_config, seed_index: int, seed: int) -> None:
    """Refuse a seed that ``train_and_evaluate`` reported as diverged (not a usable model)."""
    if not isinstance(result_or_config, Mapping) or "per_seed" not in result_or_config:
        return
    record = result_or_config["per_seed"][seed_index]
    if record.get("diverged"):
        raise ValueError(
            f"seed {seed} diverged at step {record.get('diverged_step')}: a diverged model is "
            "not saved; train it again with a lower learning rate"
        )


def save_compressed(
    path: str | Path,
    result_or_config: TrainConfig | Mapping[str, Any],
    trained: Trained,
    seed_index: int = 0,
    *,
    allow_stored: bool = False,
) -> dict:
    """Write one seed of a trained subspace model as a small ``.npz`` file.

    Args:
      path: output file, written as given (a ``.npz`` name is conventional).
      result_or_config: the result dict of ``train_and_evaluate`` or its ``TrainConfig``.
      trained: the :class:`~subspace_jax.train.Trained` state (``return_state=True``), batched
        over the config's seeds.
      seed_index: which seed of the batch to save (``0 <= seed_index < len(seeds)``).
      allow_stored: when theta0 or P cannot be regenerated from the key (a checkpoint or
        burn-in theta0, a lottery P), store them in the file (4 D and 4 D d bytes) instead of
        raising.

    Returns:
      The header written (a dict; see the module docstring).

    Raises:
      ValueError: a direct run (``dim = 0``: nothing to compress), a bad ``seed_index``, a
        seed the result reports as diverged, or theta0 / P not reproducible from the key
        while ``allow_stored`` is False.
    """
    config = _config_of(result_or_config)
    if config.dim == 0:
        raise ValueError(
            "a direct run (dim = 0) has no subspace to compress; save its parameters with "
            "save_params instead"
        )
    n = len(config.seeds)
    if isinstance(seed_index, bool) or not isinstance(seed_index, int):
        raise ValueError(f"seed_index must be an integer in [0, {n - 1}], got {seed_index!r}")
    if not 0 <= seed_index < n:
        raise ValueError(f"seed_index must be in [0, {n - 1}] for {n} seeds, got {seed_index}")
    seed = int(config.seeds[seed_index])
    _check_not_diverged(result_or_config, seed_index, seed)
    sub = jax.tree_util.tree_map(lambda x: x[seed_index], trained.subs)
    trainable = jax.tree_util.tree_map(lambda x: x[seed_index], trained.trainables)
    model_config = dict(trained.model.config)
    layout = sub.layout
    shapes = jax.eval_shape(from_config(model_config).init, jax.random.key(0))
    expected = config_layout(config, shapes)
    if expected != layout:
        raise ValueError(
            "the trained state's subspace layout does not match the config's; pass the config "
            "or result this state was trained with"
        )

    # Regenerate from the key and compare bit for bit: store only what differs.
    if config.projection == LOTTERY:
        # P comes from a trajectory, never from the key: regenerate theta0 only.
        regen = _regenerate(model_config, layout, seed, proj_states=sub.proj_states)
        theta0_ok = _trees_equal(regen.theta0, sub.theta0)
        proj_ok = False
    else:
        regen = _regenerate(model_config, layout, seed)
        theta0_ok = _trees_equal(regen.theta0, sub.theta0)
        if not theta0_ok:
            # The loader will draw P through the stored theta0: check that very computation.
            regen = _regenerate(model_config, layout, seed, theta0=sub.theta0)
        proj_ok = _trees_equal(regen.proj_states, sub.proj_states)
    notes = []
    if not theta0_ok:
        notes.append(
            "theta0 is not the model's initialisation from the key (a checkpoint, theta0_fn or "
            "burn-in): it is stored in the file (4 D bytes)"
        )
    if not proj_ok:
        if config.projection == LOTTERY:
            what = "a lottery subspace: P comes from a training trajectory"
        else:
            what = "the projection differs from the one regenerated from the key"
        notes.append(f"{what}; P is stored in the file (4 D d bytes)")
    if notes and not allow_stored:
        raise ValueError(
            "cannot compress to key + w: "
            + "; ".join(notes)
            + ". Pass allow_stored=True (CLI: the file then stores them) or keep the full "
            "parameters"
        )

    arrays: dict[str, np.ndarray] = {"w": np.asarray(jax.device_get(trainable["w"]), np.float32)}
    if "said" in trainable:
        arrays["said"] = np.asarray(jax.device_get(trainable["said"]), np.float32)
    for j, leaf in enumerate(trainable["direct"]):
        arrays[f"direct_{j}"] = np.asarray(jax.device_get(leaf))
    if not theta0_ok:
        for j, leaf in enumerate(jax.tree_util.tree_leaves(sub.theta0)):
            arrays[f"theta0_{j}"] = np.asarray(jax.device_get(leaf))
    if not proj_ok:
        for g, state in enumerate(sub.proj_states):
            for k, leaf in enumerate(jax.tree_util.tree_leaves(state)):
                arrays[f"proj_{g}_{k}"] = np.asarray(jax.device_get(leaf))

    params = _to_params(sub, trainable)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "seed_index": int(seed_index),
        "key_rule": KEY_RULE,
        "prng": _prng_settings(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "projection": {
            "name": config.projection,
            "per_layer": bool(config.per_layer),
            "said": bool(layout.said),
            "dim": int(layout.total_dim),
            "w_dim": int(layout.dim),
            "said_scales": int(layout.num_scales),
            "groups": _layout_spec(layout),
        },
        "model_config": model_config,
        "train_config": config.to_dict(),
        "input_shape": list(model_config["input_shape"]),
        "num_params": int(layout.num_params),
        "theta0_reproducible": bool(theta0_ok),
        "projection_reproducible": bool(proj_ok),
        "stored": sorted(arrays),
        "notes": notes,
        "params_sha256": params_digest(params),
    }
    if isinstance(result_or_config, Mapping) and "per_seed" in result_or_config:
        header["test_accuracy"] = result_or_config["per_seed"][seed_index].get("test_accuracy")
    raw = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, header=raw, **arrays)
    return header


def _read(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed model {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r} as a compressed model (.npz): {e}") from None
    if "header" not in arrays:
        raise ValueError(f"{str(path)!r} is not a subspace-jax compressed model (no header)")
    try:
        header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} has a corrupt header: {e}") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} file (format {header.get('format')!r})")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {header.get('version')!r}; this subspace-jax "
            f"reads version {VERSION}"
        )
    return header, arrays


def load_compressed(path: str | Path) -> tuple[PyTree, dict]:
    """Rebuild the full Flax parameter tree of a compressed model.

    theta0 and the projections are regenerated from the stored seed and configs (or read from
    the file where they were stored), then ``theta = theta0 + P w`` is evaluated with the same
    jitted :func:`~subspace_jax.to_params` as at save time.

    Args:
      path: a file written by :func:`save_compressed`.

    Returns:
      ``(params, info)``: ``params`` the model's variables ``{"params": {...}}``, identical bit
      for bit to the trained ones on the same platform; ``info`` the file's header plus
      ``params_match`` (the rebuilt parameters' digest equals the stored one) and
      ``file_bytes``. Rebuild the model with
      ``subspace_jax.models.from_config(info["model_config"])``.

    Raises:
      FileNotFoundError, ValueError: missing, unreadable or inconsistent file.

    Warns:
      RuntimeWarning: if the PRNG settings differ from the file's, or the rebuilt parameters do
        not match the stored digest (another platform or JAX version: close, not bit-equal).
    """
    header, arrays = _read(path)
    config = train_config_from_dict(header["train_config"])
    model = from_config(header["model_config"])
    layout = config_layout(config, jax.eval_shape(model.init, jax.random.key(0)))
    if _layout_spec(layout) != header["projection"]["groups"]:
        raise ValueError(
            f"{str(path)!r}: the subspace layout rebuilt from the configs does not match the "
            "file's projection groups (a file from another version?)"
        )
    if _prng_settings() != header["prng"]:
        warnings.warn(
            f"PRNG settings {_prng_settings()} differ from the file's {header['prng']}: the "
            "regenerated theta0 and P will not match",
            RuntimeWarning,
            stacklevel=2,
        )

    def need(name):
        if name not in arrays:
            raise ValueError(f"{str(path)!r} lacks the array {name!r}")
        return arrays[name]

    theta0 = None
    if not header["theta0_reproducible"]:
        leaves = [jnp.asarray(need(f"theta0_{j}")) for j in range(len(layout.spec.leaves))]
        theta0 = jax.tree_util.tree_unflatten(layout.spec.treedef, leaves)
    proj_states = None
    if not header["projection_reproducible"]:
        proj_states = []
        for g, grp in enumerate(layout.groups):
            proj = get_projection(grp.projection)
            template = jax.eval_shape(
                lambda key, p=proj, g=grp: p.init(key, g.size, g.dim), jax.random.key(0)
            )
            leaves, treedef = jax.tree_util.tree_flatten(template)
            got = [jnp.asarray(need(f"proj_{g}_{k}")) for k in range(len(leaves))]
            for k, (t, a) in enumerate(zip(leaves, got, strict=True)):
                if tuple(t.shape) != a.shape:
                    raise ValueError(
                        f"{str(path)!r}: proj_{g}_{k} has shape {a.shape}, expected {t.shape}"
                    )
            proj_states.append(jax.tree_util.tree_unflatten(treedef, got))
    sub = _regenerate(
        header["model_config"],
        layout,
        int(header["seed"]),
        theta0=theta0,
        proj_states=proj_states,
    )
    w = jnp.asarray(need("w"))
    if w.shape != (layout.dim,):
        raise ValueError(f"{str(path)!r}: w has shape {w.shape}, expected ({layout.dim},)")
    trainable = {
        "w": w,
        "direct": tuple(jnp.asarray(need(f"direct_{j}")) for j in range(len(layout.direct_leaves))),
    }
    if layout.said:
        trainable["said"] = jnp.asarray(need("said"))
    params = _to_params(sub, trainable)
    info = dict(header)
    info["params_match"] = params_digest(params) == header["params_sha256"]
    info["file_bytes"] = Path(path).stat().st_size
    if not info["params_match"]:
        warnings.warn(
            f"{str(path)!r}: the rebuilt parameters differ from the saved ones (saved with JAX "
            f"{header['jax_version']} on {header['backend']}; now JAX {jax.__version__} on "
            f"{jax.default_backend()}): expect small numerical differences",
            RuntimeWarning,
            stacklevel=2,
        )
    return params, info


def compressed_size_report(path: str | Path, num_params: int | None = None) -> dict:
    """Size of a compressed model against the full float32 parameters.

    Args:
      path: a file written by :func:`save_compressed`.
      num_params: D; None reads it from the file's header.

    Returns:
      ``{"file_bytes", "full_bytes" (= 4 D), "num_params", "ratio" (full / file),
      "stored"}``.
    """
    if num_params is None:
        header, _ = _read(path)
        num_params = int(header["num_params"])
        stored = header["stored"]
    else:
        stored = None
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 1:
        raise ValueError(f"num_params must be an integer >= 1, got {num_params!r}")
    size = Path(path).stat().st_size
    full = 4 * num_params
    return {
        "file_bytes": int(size),
        "full_bytes": int(full),
        "num_params": int(num_params),
        "ratio": full / size,
        "stored": stored,
    }


def evaluate_compressed(
    path: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    data=None,
    chunk: int = 1000,
) -> dict:
    """Load a compressed model and measure its test accuracy.

    The data are preprocessed with the file's train config (image size, validation split and
    seed, which set the normalisation statistics), with ``dataset`` / ``data_dir`` overriding.

    Args:
      path: a file written by :func:`save_compressed`.
      dataset: dataset name (default: the one it was trained on).
      data_dir: folder of the dataset's files (default: the training run's).
      data: an already loaded :class:`~subspace_jax.data.Dataset` (overrides the two above).
      chunk: examples per forward pass.

    Returns:
      ``{"test_accuracy", "test_loss", "num_test", "dataset", "params_match", "file_bytes",
      "num_params", "dim"}``.
    """
    params, info = load_compressed(path)
    model = from_config(info["model_config"])
    if data is None:
        config = train_config_from_dict(info["train_config"])
        changes = {}
        if dataset is not None:
            changes["dataset"] = dataset
        if data_dir is not None:
            changes["data_dir"] = data_dir
        data = load_data(dataclasses.replace(config, **changes))
    shape = tuple(int(s) for s in data.x_test.shape[1:])
    if list(shape) != list(info["input_shape"]):
        raise ValueError(
            f"the model expects inputs of shape {tuple(info['input_shape'])}, the dataset "
            f"{data.name!r} gives {shape}"
        )
    apply = jax.jit(model.apply)
    correct = 0
    loss = 0.0
    for start in range(0, len(data.x_test), chunk):
        logits = apply(params, jnp.asarray(data.x_test[start : start + chunk]))
        y = jnp.asarray(data.y_test[start : start + chunk])
        correct += int(jnp.sum(jnp.argmax(logits, -1) == y))
        logp = jax.nn.log_softmax(logits)
        loss += float(-jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1)))
    n = len(data.x_test)
    return {
        "test_accuracy": correct / n,
        "test_loss": loss / n,
        "num_test": n,
        "dataset": data.name,
        "params_match": info["params_match"],
        "file_bytes": info["file_bytes"],
        "num_params": info["num_params"],
        "dim": info["projection"]["dim"],
    }
