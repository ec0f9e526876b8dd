"""Compressed models: a trained subspace model stored as its key, its configs and ``w``.

A model trained in a random subspace is ``theta = theta0 + P w`` where ``theta0`` and ``P`` are
both derived from one seed: ``k_model, k_proj = jax.random.split(jax.random.key(seed))``,
``theta0 = model.init(k_model)`` and group g's projection is drawn from
``fold_in(k_proj, g)``. So the seed, the model and subspace configuration and the d numbers
``w`` are enough to rebuild every one of the model's D parameters, bit for bit on the same
platform (same JAX version and PRNG settings, same backend).

File format (one ``.npz``, written without pickle; docs/compressed-format.md has the details).
Since version 3 it is :func:`~subspace_jax.save_subspace`'s format, with the built-in model's
configs added:

* ``header``: UTF-8 JSON as a ``uint8`` array: ``format``, ``version``, the ``seed`` and its
  ``key_rule``, the PRNG settings, the ``platform`` it was saved on, the ``projection`` spec
  (name, per-layer, SAID, the groups' leaves and sizes), ``model_config``
  (:attr:`~subspace_jax.models.ModelDef.config`), ``train_config``
  (:meth:`~subspace_jax.train.TrainConfig.to_dict`), ``input_shape``, ``theta0_reproducible``,
  ``projection_reproducible``, the arrays ``stored``, ``notes``, and ``params_sha256`` (a
  digest of the trained parameters, checked on load); version 3 adds ``keys`` (the
  projection and init keys), ``layout``, ``others``, ``dtypes`` and ``theta0_sha256``.
* ``w``: float32 ``(d,)``; ``said``: float32 ``(m,)`` for SAID; ``direct_<j>``: directly
  trained leaves, if any; ``other_<j>``: the trained model state (BatchNorm statistics) of a
  model with state, listed in the header's ``others``.
* Only when they cannot be regenerated from the key: ``theta0_<j>`` (one per leaf: theta0 came
  from a checkpoint, a ``theta0_fn`` or a burn-in) and ``proj_<g>_<k>`` (the leaves of group g's
  projection state: a lottery subspace, whose P comes from a training trajectory). Such a file
  is no longer small (theta0 costs 4 D bytes, a lottery P 4 D d bytes), so
  :func:`save_compressed` refuses to write it unless ``allow_stored=True``.
* The zip comment, the file's last 71 bytes: ``sha256:`` and the hex SHA-256 of every byte
  before the last 64 (so of the header, the arrays and the zip structure).

Files are written atomically (a temporary file beside the destination, fsync, rename), so the
destination holds the old file or the complete new one, never a part. Loading checks, in this
order, the file digest, the header's fields, that every stored array is finite, and the
rebuilt parameters against ``params_sha256``; whatever fails is one
:class:`CompressedModelError` naming the file. Rebuilt parameters that are not bit-equal are
measured against ``params_probe`` (random projections of the saved parameters, which estimate
the relative distance ``||theta - theta_saved|| / ||theta_saved||``): rounding (at most
:data:`PROBE_TOLERANCE`) is a warning, which names the platform fields that differ from the
file's (JAX and jaxlib versions, backend, device, CPU, PRNG settings) if any; anything larger
is another model, an error.

Whether theta0 and P are reproducible is not taken on trust: :func:`save_compressed`
regenerates them from the key exactly as :func:`load_compressed` will and compares them bit for
bit with the trained ones; whatever differs is stored.

Example:
  >>> result, trained = train_and_evaluate(config, data)
  >>> save_compressed("model.npz", result, trained)
  >>> params, info = load_compressed("model.npz")
  >>> compressed_size_report("model.npz")["ratio"]  # full float32 bytes / file bytes
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax._archive import (
    FORMAT,
    PROBE_COUNT,
    PROBE_TOLERANCE,
    READABLE_VERSIONS,
    VERSION,
    CompressedModelError,
    _probe_distance,  # noqa: F401  (imported from here by the tests)
    check_arrays,
    check_fields,
    check_probe,
    check_rebuilt,
    non_finite,
    params_digest,
    params_probe,
    platform_differences,
    read_archive,
    trees_equal,
    write_archive,
)
from subspace_jax._checkpoint import load_params, save_params
from subspace_jax._save import (
    SUBSPACE_FIELDS,
    need,
    restored,
    stored_others,
    stored_states,
    subspace_arrays,
    subspace_fields,
    trainable_from_arrays,
)
from subspace_jax._subspace import Layout, Subspace, check_finite, init_from_layout, to_params
from subspace_jax.models import from_config
from subspace_jax.train import (
    LOTTERY,
    TrainConfig,
    Trained,
    config_layout,
    load_data,
    make_init_fn,
    run_keys,
    split_state,
)

PyTree = Any

KEY_RULE = (
    "k_model, k_proj = jax.random.split(jax.random.key(seed)); theta0 = model.init(k_model); "
    "projection of group g = init(jax.random.fold_in(k_proj, g), D_g, d_g); computed as "
    "subspace_jax.train.make_init_fn on a batch of one key"
)

#: Kept for code that imported them from here (they live in :mod:`subspace_jax._archive`).
_write_archive = write_archive
_trees_equal = trees_equal
_non_finite = non_finite
__all__ = [
    "FORMAT",
    "PROBE_COUNT",
    "PROBE_TOLERANCE",
    "READABLE_VERSIONS",
    "KEY_RULE",
    "VERSION",
    "CompressedModelError",
    "compressed_size_report",
    "evaluate_compressed",
    "load_compressed",
    "load_params",
    "params_probe",
    "save_compressed",
    "save_params",
    "train_config_from_dict",
]


# ------------------------------------------------------------------------------ helpers


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
    check_finite(sub)
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

    The file is :func:`~subspace_jax.save_subspace`'s (format version 3) with the built-in
    model's configs added, so :func:`load_compressed` rebuilds it from the file alone.

    Args:
      path: output file, written as given (a ``.npz`` name is conventional).
      result_or_config: the result dict of ``train_and_evaluate`` or its ``TrainConfig``.
      trained: the :class:`~subspace_jax.train.Trained` state (``train_and_evaluate(...)
        .trained``), batched over the config's seeds.
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
    config, seed = _checked_seed(result_or_config, seed_index)
    sub, train_vars, model_config = _seed_state(config, trained, seed_index)
    # A model with state (BatchNorm statistics): its trained state is stored as it is.
    trainable, state = split_state(train_vars)
    others = dict(state or {})
    regen = _reproducibility(config, model_config, sub, seed)
    if regen["notes"] and not allow_stored:
        raise ValueError(
            "cannot compress to key + w: "
            + "; ".join(regen["notes"])
            + ". Pass allow_stored=True (CLI: the file then stores them) or keep the full "
            "parameters"
        )
    arrays, dtypes = subspace_arrays(sub, trainable, others, regen)
    bad = non_finite(arrays)
    if bad:
        raise ValueError(
            f"seed {seed} has non-finite values in {', '.join(bad)} (the run diverged): "
            f"{str(path)!r} was not written"
        )
    params = _to_params(sub, trainable, state)
    k_model, k_proj = jax.random.split(run_keys([seed])[0])
    header = {
        "format": FORMAT,
        "version": VERSION,
        **subspace_fields(sub, k_proj, k_model, others, regen, arrays, dtypes, params),
        **_model_fields(config, model_config, sub.layout, seed, seed_index),
    }
    if isinstance(result_or_config, Mapping) and "per_seed" in result_or_config:
        header["test_accuracy"] = result_or_config["per_seed"][seed_index].get("test_accuracy")
    write_archive(path, header, arrays)
    return header


def _checked_seed(result_or_config, seed_index: Any) -> tuple[TrainConfig, int]:
    """The config and the seed at ``seed_index``, refused if direct, out of range or diverged."""
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
    return config, seed


def _seed_state(config: TrainConfig, trained: Trained, seed_index: int):
    """``(sub, trainable, model_config)`` of one seed, its layout checked against the config."""
    sub = jax.tree_util.tree_map(lambda x: x[seed_index], trained.subs)
    trainable = jax.tree_util.tree_map(lambda x: x[seed_index], trained.trainables)
    model_config = dict(trained.model.config)
    shapes = jax.eval_shape(from_config(model_config).init, jax.random.key(0))
    if config_layout(config, shapes) != sub.layout:
        raise ValueError(
            "the trained state's subspace layout does not match the config's; pass the config "
            "or result this state was trained with"
        )
    return sub, trainable, model_config


def _reproducibility(config: TrainConfig, model_config: dict, sub: Subspace, seed: int) -> dict:
    """Regenerate theta0 and P from the key and compare bit for bit: what must be stored.

    Returns:
      ``{"theta0_ok", "states_ok", "notes"}`` (what :func:`subspace_fields` records).
    """
    layout = sub.layout
    if config.projection == LOTTERY:
        # P comes from a trajectory, never from the key: regenerate theta0 only.
        regen = _regenerate(model_config, layout, seed, proj_states=sub.proj_states)
        theta0_ok = trees_equal(regen.theta0, sub.theta0)
        proj_ok = False
    else:
        regen = _regenerate(model_config, layout, seed)
        theta0_ok = trees_equal(regen.theta0, sub.theta0)
        if not theta0_ok:
            # The loader will draw P through the stored theta0: check that very computation.
            regen = _regenerate(model_config, layout, seed, theta0=sub.theta0)
        proj_ok = trees_equal(regen.proj_states, sub.proj_states)
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
    return {"theta0_ok": theta0_ok, "states_ok": proj_ok, "notes": notes}


def _model_fields(config, model_config, layout: Layout, seed: int, seed_index: int) -> dict:
    """The header fields of a built-in model: seed, key rule, configs, projection summary."""
    return {
        "seed": seed,
        "seed_index": int(seed_index),
        "key_rule": KEY_RULE,
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
    }


#: Header fields every readable file has, with their JSON types.
_HEADER_FIELDS = {
    "seed": int,
    "seed_index": int,
    "key_rule": str,
    "prng": dict,
    "jax_version": str,
    "backend": str,
    "projection": dict,
    "model_config": dict,
    "train_config": dict,
    "input_shape": list,
    "num_params": int,
    "theta0_reproducible": bool,
    "projection_reproducible": bool,
    "stored": list,
    "notes": list,
    "params_sha256": str,
}
_PROJECTION_FIELDS = {"groups": list, "dim": int}


def _read(path: str | Path) -> tuple[dict, dict[str, np.ndarray], bool]:
    """The verified header and arrays of a compressed model, and whether it had a digest.

    Raises:
      FileNotFoundError: no such file.
      CompressedModelError: anything wrong with the file (see the module docstring).
    """
    header, arrays, has_digest = read_archive(path)
    name = repr(str(path))
    version = header["version"]
    check_fields(header, _HEADER_FIELDS, name, "header")
    check_fields(header["projection"], _PROJECTION_FIELDS, name, "header's projection")
    if version >= 2:
        check_probe(header, name)
    if version >= 3:
        check_fields(header, SUBSPACE_FIELDS, name, "header")
    check_arrays(header, arrays, name)
    if version >= 3:
        arrays = {k: restored(a, header["dtypes"].get(k, a.dtype.name)) for k, a in arrays.items()}
    if not has_digest:
        warnings.warn(
            f"{name} is a format version {version} file, written before file digests: only "
            "the rebuilt parameters are checked (against its params_sha256)",
            RuntimeWarning,
            stacklevel=3,
        )
    return header, arrays, has_digest


def load_compressed(path: str | Path) -> tuple[PyTree, dict]:
    """Rebuild the full Flax parameter tree of a compressed model.

    theta0 and the projections are regenerated from the stored seed and configs (or read from
    the file where they were stored), then ``theta = theta0 + P w`` is evaluated with the same
    jitted :func:`~subspace_jax.to_params` as at save time. Reads format versions 1 to 3.

    Args:
      path: a file written by :func:`save_compressed`.

    Returns:
      ``(params, info)``: ``params`` the model's variables ``{"params": {...}}``, identical bit
      for bit to the trained ones on the same platform; ``info`` the file's header plus
      ``params_match`` (the rebuilt parameters' digest equals the stored one),
      ``params_distance`` (the estimated ``||theta - theta_saved|| / ||theta_saved||``: 0.0
      when bit-equal, None when unknown), ``digest_verified`` (the file carried a digest and it
      matched; False only for format version 1), ``platform_differences`` (strings such as
      ``"jax_version '0.4.30' -> '0.4.31'"``; empty on the saving platform) and
      ``file_bytes``. Rebuild the model with
      ``subspace_jax.models.from_config(info["model_config"])``.

    Raises:
      FileNotFoundError: no such file.
      CompressedModelError: an empty, truncated or unreadable file, a digest mismatch, a
        missing or mistyped header field or array, non-finite values, a header inconsistent
        with this version, or rebuilt parameters that differ from the saved ones on the
        platform the file was saved on.

    Warns:
      RuntimeWarning: the rebuilt parameters differ from the saved ones and the platform or
        PRNG settings differ from the file's (close, not bit-equal); a version 1 file.
    """
    header, arrays, has_digest = _read(path)
    name = repr(str(path))
    layout, shapes = _header_layout(header, name)
    sub = _regenerate(
        header["model_config"],
        layout,
        int(header["seed"]),
        theta0=_stored_theta0(header, arrays, layout, name),
        proj_states=stored_states(header, arrays, layout, name),
    )
    trainable = trainable_from_arrays(arrays, layout, name)
    state = None
    if header.get("others"):  # the trained model state (BatchNorm statistics)
        state = stored_others(header, arrays, shapes, layout, name)
    params = _to_params(sub, trainable, state)
    info = dict(header)
    info["params_match"] = params_digest(params) == header["params_sha256"]
    info["params_distance"] = 0.0
    info["digest_verified"] = has_digest
    info["platform_differences"] = diffs = platform_differences(header)
    info["file_bytes"] = Path(path).stat().st_size
    if not info["params_match"]:
        check_rebuilt(name, header, params, diffs, info)
    return params, info


def _header_layout(header: dict, name: str) -> tuple[Layout, PyTree]:
    """The subspace layout of the header's configs, checked against its projection groups,
    and the shapes of the model's variables."""
    try:
        config = train_config_from_dict(header["train_config"])
        model = from_config(header["model_config"])
        shapes = jax.eval_shape(model.init, jax.random.key(0))
        layout = config_layout(config, shapes)
    except (KeyError, TypeError, ValueError) as e:
        raise CompressedModelError(
            f"compressed model {name}: its header's configs do not rebuild a model "
            f"({type(e).__name__}: {e})"
        ) from None
    if _layout_spec(layout) != header["projection"]["groups"]:
        raise CompressedModelError(
            f"compressed model {name}: the subspace layout rebuilt from the configs does not "
            "match the file's projection groups (a file from another version?)"
        )
    return layout, shapes


def _stored_theta0(header: dict, arrays: dict, layout: Layout, name: str) -> PyTree | None:
    """theta0 from the file's ``theta0_<j>`` arrays (None when it is regenerated)."""
    if header["theta0_reproducible"]:
        return None
    n = len(layout.spec.leaves)
    leaves = [jnp.asarray(need(arrays, f"theta0_{j}", name)) for j in range(n)]
    return jax.tree_util.tree_unflatten(layout.spec.treedef, leaves)


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
        header, _, _ = _read(path)
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
      ``{"test_accuracy", "test_loss", "num_test", "dataset", "params_match",
      "params_distance", "digest_verified", "platform_differences", "file_bytes",
      "num_params", "dim"}`` (see :func:`load_compressed`).

    Raises:
      FileNotFoundError, CompressedModelError: as :func:`load_compressed`.
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
        "params_distance": info["params_distance"],
        "digest_verified": info["digest_verified"],
        "platform_differences": info["platform_differences"],
        "file_bytes": info["file_bytes"],
        "num_params": info["num_params"],
        "dim": info["projection"]["dim"],
    }
