"""Compressed models: a trained subspace model stored as its key, its configs and ``w``.

A model trained in a random subspace is ``theta = theta0 + P w`` where ``theta0`` and ``P`` are
both derived from one seed: ``k_model, k_proj = jax.random.split(jax.random.key(seed))``,
``theta0 = model.init(k_model)`` and group g's projection is drawn from
``fold_in(k_proj, g)``. So the seed, the model and subspace configuration and the d numbers
``w`` are enough to rebuild every one of the model's D parameters, bit for bit on the same
platform (same JAX version and PRNG settings, same backend).

File format (one ``.npz``, written without pickle; docs/compressed-format.md has the details):

* ``header``: UTF-8 JSON as a ``uint8`` array: ``format``, ``version``, the ``seed`` and its
  ``key_rule``, the PRNG settings, the ``platform`` it was saved on, the ``projection`` spec
  (name, per-layer, SAID, the groups' leaves and sizes), ``model_config``
  (:attr:`~subspace_jax.models.ModelDef.config`), ``train_config``
  (:meth:`~subspace_jax.train.TrainConfig.to_dict`), ``input_shape``, ``theta0_reproducible``,
  ``projection_reproducible``, the arrays ``stored``, ``notes``, and ``params_sha256`` (a
  digest of the trained parameters, checked on load).
* ``w``: float32 ``(d,)``; ``said``: float32 ``(m,)`` for SAID; ``direct_<j>``: directly
  trained leaves, if any.
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
import hashlib
import hmac
import json
import os
import platform
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax._checkpoint import load_params, save_params
from subspace_jax._results import atomic_write
from subspace_jax._subspace import Layout, Subspace, check_finite, init_from_layout, to_params
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
VERSION = 2
#: Versions this release reads. Version 1 (before file digests) is read with a warning.
READABLE_VERSIONS = (1, 2)
#: The zip comment is this prefix and 64 hex digits: the SHA-256 of the file's other bytes.
DIGEST_PREFIX = b"sha256:"
_DIGEST_HEX = 64
_EOCD = b"PK\x05\x06"  # the zip end-of-central-directory record: 22 bytes, then the comment
_EOCD_SIZE = 22
#: ``params_probe``: this many random projections, drawn from this numpy seed, in blocks.
PROBE_COUNT = 8
PROBE_SEED = 0
_PROBE_BLOCK = 1 << 20
#: Rebuilt parameters within this relative distance of the saved ones differ by rounding only
#: (another platform's summation order, TF32 matmuls); farther ones are another model.
PROBE_TOLERANCE = 5e-3
KEY_RULE = (
    "k_model, k_proj = jax.random.split(jax.random.key(seed)); theta0 = model.init(k_model); "
    "projection of group g = init(jax.random.fold_in(k_proj, g), D_g, d_g); computed as "
    "subspace_jax.train.make_init_fn on a batch of one key"
)

__all__ = [
    "FORMAT",
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


class CompressedModelError(ValueError):
    """A compressed model that cannot be trusted: empty, truncated, unreadable, altered after
    saving, incomplete or holding non-finite numbers. The message names the file."""


# ------------------------------------------------------------------------------ helpers


def _prng_settings() -> dict:
    return {
        "impl": str(jax.config.jax_default_prng_impl),
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    }


def _platform() -> dict:
    """What the bit-exactness of the rebuilt parameters depends on, besides the PRNG."""
    import jaxlib

    from subspace_jax.bench import cpu_model_name

    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpu": cpu_model_name(),
    }


def _platform_differences(header: Mapping[str, Any]) -> list[str]:
    """``"name 'saved' -> 'now'"`` for each recorded platform field or PRNG setting that
    differs (version 1 files record only ``jax_version`` and ``backend``)."""
    saved = header.get("platform") or {
        "jax_version": header["jax_version"],
        "backend": header["backend"],
    }
    now = _platform()
    out = [
        f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(saved) if k in now and saved[k] != now[k]
    ]
    if header["prng"] != _prng_settings():
        out.append(f"PRNG settings {header['prng']} -> {_prng_settings()}")
    return out


def params_digest(params: PyTree) -> str:
    """SHA-256 of a parameter tree's leaves (flatten order, native bytes, with shapes)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def params_probe(params: PyTree) -> dict:
    """Random projections of a parameter tree, to measure how far another tree is from it.

    The leaves (flatten order) are read as one float64 vector ``theta`` of length D; row k of a
    ``(PROBE_COUNT, D)`` standard normal matrix V is drawn by
    ``numpy.random.default_rng(PROBE_SEED)``, block by block (each leaf in blocks of 2**20
    entries, each block ``standard_normal((PROBE_COUNT, size))``). Since
    ``E[(v . delta)^2] = ||delta||^2`` for a standard normal v,
    ``sqrt(mean_k ((V theta)_k - (V theta')_k)^2)`` estimates ``||theta - theta'||``.

    Returns:
      ``{"values": V theta (PROBE_COUNT floats), "norm": ||theta||}``.
    """
    rng = np.random.default_rng(PROBE_SEED)
    values = np.zeros(PROBE_COUNT)
    sq = 0.0
    for leaf in jax.tree_util.tree_leaves(params):
        flat = np.asarray(jax.device_get(leaf), np.float64).ravel()
        sq += float(flat @ flat)
        for start in range(0, flat.size, _PROBE_BLOCK):
            block = flat[start : start + _PROBE_BLOCK]
            values += rng.standard_normal((PROBE_COUNT, block.size)) @ block
    return {"values": [float(v) for v in values], "norm": float(np.sqrt(sq))}


def _probe_distance(saved: Mapping[str, Any], params: PyTree) -> float:
    """Estimated ``||params - saved|| / ||saved||`` from the saved :func:`params_probe`."""
    now = params_probe(params)
    diff = np.asarray(now["values"]) - np.asarray(saved["values"], np.float64)
    return float(np.sqrt(np.mean(diff**2)) / max(float(saved["norm"]), np.finfo(float).tiny))


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
    bad = _non_finite(arrays)
    if bad:
        raise ValueError(
            f"seed {seed} has non-finite values in {', '.join(bad)} (the run diverged): "
            f"{str(path)!r} was not written"
        )

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
        "platform": _platform(),
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
        "params_probe": params_probe(params),
    }
    if isinstance(result_or_config, Mapping) and "per_seed" in result_or_config:
        header["test_accuracy"] = result_or_config["per_seed"][seed_index].get("test_accuracy")
    _write_archive(path, header, arrays)
    return header


def _non_finite(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays holding a NaN or an infinity, with their counts."""
    out = []
    for name in sorted(arrays):
        a = arrays[name]
        if np.issubdtype(a.dtype, np.inexact):
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            if n:
                out.append(f"{name} ({n} of {a.size})")
    return out


def _write_archive(path: str | Path, header: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """Write ``header`` and ``arrays`` as a digest-sealed ``.npz``, atomically.

    The low-level writer behind :func:`save_compressed` (tests use it to build altered files
    that still carry a valid digest). The archive is written to a temporary file beside
    ``path``; its zip comment is set to ``sha256:`` and the hex SHA-256 of every byte before
    those 64 digits; the file is fsynced and renamed to ``path``. On any failure ``path`` is
    left as it was and the temporary file is removed.

    Args:
      path: the destination; its folder must exist.
      header: the JSON header (stored as the ``uint8`` array ``header``).
      arrays: the other arrays, by name.
    """
    raw = np.frombuffer(json.dumps(dict(header), sort_keys=True).encode("utf-8"), np.uint8)
    with atomic_write(path, "w+b") as f:
        np.savez(f, header=raw, **arrays)
        with zipfile.ZipFile(f, "a") as zf:
            zf.comment = DIGEST_PREFIX + b"0" * _DIGEST_HEX  # a placeholder of the final size
        size = f.seek(0, os.SEEK_END)
        digest = _sha256_of_prefix(f, size - _DIGEST_HEX)
        f.seek(size - _DIGEST_HEX)
        f.write(digest.encode("ascii"))


def _sha256_of_prefix(f, n: int) -> str:
    """Hex SHA-256 of the first ``n`` bytes of the open binary file ``f`` (moves its position)."""
    h = hashlib.sha256()
    f.seek(0)
    left = n
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise EOFError("file shorter than expected")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _check_digest(f, size: int, name: str) -> bool:
    """Verify the file digest in the zip comment of the open file ``f`` of ``size`` bytes.

    Returns:
      True when the digest is present and matches; False for a complete zip archive without a
      comment (a file written before digests, or by hand).

    Raises:
      CompressedModelError: a digest that does not match, or an end that is neither.
    """
    tail_len = _EOCD_SIZE + len(DIGEST_PREFIX) + _DIGEST_HEX
    f.seek(max(0, size - tail_len))
    tail = f.read()
    if len(tail) >= _EOCD_SIZE and tail[-_EOCD_SIZE:][:4] == _EOCD and tail[-2:] == b"\0\0":
        return False
    comment_len = len(DIGEST_PREFIX) + _DIGEST_HEX
    if (
        len(tail) == tail_len
        and tail[:4] == _EOCD
        and int.from_bytes(tail[_EOCD_SIZE - 2 : _EOCD_SIZE], "little") == comment_len
        and tail[_EOCD_SIZE:].startswith(DIGEST_PREFIX)
    ):
        stored = tail[-_DIGEST_HEX:]
        actual = _sha256_of_prefix(f, size - _DIGEST_HEX).encode("ascii")
        if not hmac.compare_digest(stored, actual):
            raise CompressedModelError(
                f"compressed model {name} is damaged or was altered after saving: its SHA-256 "
                "does not match the digest stored in it"
            )
        return True
    raise CompressedModelError(
        f"compressed model {name} is incomplete or not a subspace-jax compressed model: it does "
        "not end with a zip archive's end record and digest (a truncated or partly written file?)"
    )


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


def _check_fields(header: Mapping[str, Any], fields: Mapping[str, type], name: str, where: str):
    for key, kind in fields.items():
        if key not in header:
            raise CompressedModelError(f"compressed model {name}: the {where} lacks {key!r}")
        value = header[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CompressedModelError(
                f"compressed model {name}: the {where}'s {key!r} is {type(value).__name__} "
                f"{value!r:.60}, expected {kind.__name__}"
            )


def _read(path: str | Path) -> tuple[dict, dict[str, np.ndarray], bool]:
    """The verified header and arrays of a compressed model, and whether it had a digest.

    Raises:
      FileNotFoundError: no such file.
      CompressedModelError: anything wrong with the file (see the module docstring).
    """
    path = Path(path)
    name = repr(str(path))
    if not path.exists():
        raise FileNotFoundError(f"compressed model {name} does not exist")
    if not path.is_file():
        raise CompressedModelError(f"compressed model {name} is not a file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CompressedModelError(
                f"compressed model {name} is empty (0 bytes): an interrupted save? Save it again"
            )
        has_digest = _check_digest(f, size, name)
        f.seek(0)
        try:
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # any failure to parse these bytes is the file's fault
            raise CompressedModelError(
                f"cannot read compressed model {name} (.npz): {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    if "header" not in arrays:
        raise CompressedModelError(f"{name} is not a subspace-jax compressed model (no header)")
    try:
        header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressedModelError(f"compressed model {name} has a corrupt header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise CompressedModelError(f"{name} is not a {FORMAT} file (format {fmt!r})")
    version = header.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CompressedModelError(
            f"{name} has format version {version!r}; this subspace-jax reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version >= 2 and not has_digest:
        raise CompressedModelError(
            f"compressed model {name} has no digest (format version {version} files end with "
            "one): it was rewritten by another tool or damaged; it cannot be verified"
        )
    _check_fields(header, _HEADER_FIELDS, name, "header")
    _check_fields(header["projection"], _PROJECTION_FIELDS, name, "header's projection")
    if version >= 2:
        _check_fields(header, {"params_probe": dict}, name, "header")
        probe = header["params_probe"]
        _check_fields(probe, {"values": list, "norm": float}, name, "header's params_probe")
        if len(probe["values"]) != PROBE_COUNT or not all(
            isinstance(v, float) for v in probe["values"]
        ):
            raise CompressedModelError(
                f"compressed model {name}: the header's params_probe values are not "
                f"{PROBE_COUNT} numbers"
            )
    missing = sorted(set(header["stored"]) - set(arrays))
    if missing:
        raise CompressedModelError(f"compressed model {name} lacks the arrays {missing}")
    bad = _non_finite(arrays)
    if bad:
        raise CompressedModelError(
            f"compressed model {name} has non-finite values in {', '.join(bad)}: it was saved "
            "from a diverged run"
        )
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
    jitted :func:`~subspace_jax.to_params` as at save time.

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
    try:
        config = train_config_from_dict(header["train_config"])
        model = from_config(header["model_config"])
        layout = config_layout(config, jax.eval_shape(model.init, jax.random.key(0)))
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

    def need(key):
        if key not in arrays:
            raise CompressedModelError(f"compressed model {name} lacks the array {key!r}")
        return arrays[key]

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
                    raise CompressedModelError(
                        f"compressed model {name}: proj_{g}_{k} has shape {a.shape}, expected "
                        f"{t.shape}"
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
        raise CompressedModelError(
            f"compressed model {name}: w has shape {w.shape}, expected ({layout.dim},)"
        )
    trainable = {
        "w": w,
        "direct": tuple(jnp.asarray(need(f"direct_{j}")) for j in range(len(layout.direct_leaves))),
    }
    if layout.said:
        trainable["said"] = jnp.asarray(need("said"))
    try:
        params = _to_params(sub, trainable)
    except (TypeError, ValueError) as e:  # a direct leaf or SAID vector of the wrong shape
        raise CompressedModelError(
            f"compressed model {name}: its arrays do not fit the model ({e})"
        ) from None
    info = dict(header)
    info["params_match"] = params_digest(params) == header["params_sha256"]
    info["params_distance"] = 0.0
    info["digest_verified"] = has_digest
    info["platform_differences"] = diffs = _platform_differences(header)
    info["file_bytes"] = Path(path).stat().st_size
    if not info["params_match"]:
        _check_rebuilt(name, header, params, diffs, info)
    return params, info


def _check_rebuilt(name: str, header: dict, params: PyTree, diffs: list[str], info: dict):
    """Rebuilt parameters that are not bit-equal to the saved ones: rounding or another model?

    With a probe (version 2): rounding (within :data:`PROBE_TOLERANCE`) is a warning, which
    names the platform differences if there are any; more is an error. Without one (version
    1): an error on the saving platform, a warning elsewhere.
    """
    where = f"saved on another platform ({'; '.join(diffs)})" if diffs else ""
    info["params_distance"] = None  # unknown without a probe
    if "params_probe" in header:
        dist = _probe_distance(header["params_probe"], params)
        info["params_distance"] = dist
        if dist > PROBE_TOLERANCE:
            why = (
                f"this platform does not rebuild the saved model: it was {where}; load it "
                f"with JAX {header['jax_version']} on {header['backend']}"
                if diffs
                else "its seed, configs or arrays were altered after saving"
            )
            raise CompressedModelError(
                f"compressed model {name}: the parameters rebuilt from it are another model "
                f"(relative distance {dist:.2g} from the saved ones): {why}"
            )
        warnings.warn(
            f"{name}: the rebuilt parameters differ from the saved ones by rounding only "
            f"(relative distance {dist:.1e})" + (f"; {where}" if diffs else ""),
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if not diffs:
        raise CompressedModelError(
            f"compressed model {name}: the parameters rebuilt from it differ from the saved "
            "ones on the platform it was saved on (same JAX, backend and PRNG settings): its "
            "seed, configs or arrays were altered after saving"
        )
    warnings.warn(
        f"{name}: the rebuilt parameters differ from the saved ones; {where}",
        RuntimeWarning,
        stacklevel=3,
    )


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
