"""Save and reload a subspace model of any model: keys, layout and ``w`` in one sealed file.

``theta = theta0 + P w`` is rebuilt from what cannot be derived (``w``, the directly trained
leaves, the SAID scales and the pass-through collections such as ``batch_stats``) and from
what can: ``P`` from the projection key and the projection's name and options, ``theta0`` from
the user's own init function and its key. Whatever cannot be rebuilt that way is stored
(``theta0`` when no init function reproduces it bit for bit, ``P`` when no key or registered
projection does), and :func:`save_subspace` checks this by rebuilding the model exactly as
:func:`load_subspace` will, before writing.

The file is the compressed format (``docs/compressed-format.md``, version 3): an ``.npz`` with
a JSON header, sealed by a SHA-256 of the file and written atomically; the CLI's compressed
models are the same file with their built-in model's configs added. Loading verifies the
digest, the header, that the init function rebuilds the saved ``theta0`` (by its SHA-256) and
that the rebuilt parameters are the saved ones (by theirs).

Example:
  >>> variables = model.init(k_model, x)            # any Flax model, BatchNorm included
  >>> sub = sj.init_subspace(k_proj, variables, 200)
  >>> ... train sj.init_trainable(sub) ...
  >>> init_fn = lambda k: model.init(k, x)
  >>> sj.save_subspace("model.npz", sub, trainable, key=k_proj, init_fn=init_fn,
  ...                  init_key=k_model, collections={"batch_stats": stats})
  >>> sub, trainable, info = sj.load_subspace("model.npz", init_fn)   # in another process
  >>> model.apply(sj.to_params(sub, trainable), x, train=False)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax._archive import (
    FORMAT,
    VERSION,
    CompressedModelError,
    check_arrays,
    check_fields,
    check_probe,
    check_rebuilt,
    non_finite,
    params_digest,
    params_probe,
    platform_differences,
    platform_record,
    prng_settings,
    read_archive,
    trees_equal,
    write_archive,
)
from subspace_jax._subspace import (
    Group,
    Layout,
    Subspace,
    Trainable,
    as_trainable,
    check_finite,
    init_from_layout,
    split_collections,
    to_params,
)
from subspace_jax._tree import leaf_specs, path_to_str
from subspace_jax.projections import (
    Projection,
    get_projection,
    projection_from_options,
    projection_names,
)

PyTree = Any

_to_params = jax.jit(to_params)

#: Header fields of a version 3 file (both writers), with their JSON types.
SUBSPACE_FIELDS = {
    "keys": dict,
    "layout": dict,
    "others": list,
    "dtypes": dict,
    "theta0_sha256": str,
    "theta0_reproducible": bool,
    "projection_reproducible": bool,
    "stored": list,
    "notes": list,
    "num_params": int,
    "params_sha256": str,
    "prng": dict,
}


# ------------------------------------------------------------------ keys, specs and arrays


def key_record(key: jax.Array | None) -> dict | None:
    """A PRNG key as JSON: ``{"impl": name, "data": [uint32, ...]}`` (None stays None)."""
    if key is None:
        return None
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    if key.shape != ():
        raise ValueError(f"save one model: the key must be a single key, got shape {key.shape}")
    data = np.asarray(jax.device_get(jax.random.key_data(key))).ravel()
    return {"impl": str(jax.random.key_impl(key)), "data": [int(x) for x in data]}


def key_from_record(record: Mapping[str, Any]) -> jax.Array:
    data = np.asarray(record["data"], np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(data), impl=record["impl"])


def projection_record(projection: str | Projection) -> dict:
    """``{"name", "options"}`` naming a group's projection, so a loader can rebuild it.

    Raises:
      ValueError: a :class:`Projection` object whose name is not registered (the file could
        not name it), or options that are not JSON.
    """
    if isinstance(projection, str):
        return {"name": projection, "options": {}}
    if projection.name not in projection_names():
        raise ValueError(
            f"the projection {projection.name!r} is an object that is not registered, so a file "
            f"cannot name it: register it first (subspace_jax.register({projection.name!r}, "
            "projection)) and register it again before loading"
        )
    options = dict(projection.options)
    try:
        json.dumps(options)
    except TypeError:
        raise ValueError(
            f"the projection {projection.name!r} has options that are not JSON: {options}"
        ) from None
    return {"name": projection.name, "options": options}


def layout_record(layout: Layout) -> dict:
    """The static layout as JSON: leaves (path, shape, dtype, label), groups, SAID, collections."""
    paths = layout.spec.paths
    return {
        "leaves": [
            {"path": s.path, "shape": list(s.shape), "dtype": s.dtype, "label": lab}
            for s, lab in zip(layout.spec.leaves, layout.labels, strict=True)
        ],
        "groups": [
            {
                "leaves": [paths[i] for i in g.leaves],
                "size": int(g.size),
                "dim": int(g.dim),
                "offset": int(g.offset),
                "projection": projection_record(g.projection),
            }
            for g in layout.groups
        ],
        "said": bool(layout.said),
        "collections": None if layout.collections is None else list(layout.collections),
    }


def layout_from_record(record: Mapping[str, Any], projected: PyTree, name: str) -> Layout:
    """Rebuild the :class:`Layout` of ``record`` over ``projected`` (its tree structure).

    Raises:
      CompressedModelError: the tree's leaves (paths, shapes, dtypes) are not the file's.
    """
    spec = leaf_specs(projected)
    want = [(leaf["path"], tuple(leaf["shape"]), leaf["dtype"]) for leaf in record["leaves"]]
    have = [(s.path, s.shape, s.dtype) for s in spec.leaves]
    if want != have:
        diff = next(((w, h) for w, h in zip(want, have, strict=False) if w != h), None)
        raise CompressedModelError(
            f"compressed model {name}: the model's parameters are not the saved ones "
            f"({len(have)} leaves against the file's {len(want)}"
            + (f"; first difference: {diff[1]} against the file's {diff[0]}" if diff else "")
            + ")"
        )
    index = {p: i for i, p in enumerate(spec.paths)}
    groups = []
    for g in record["groups"]:
        proj = g["projection"]
        projection = proj["name"]
        if proj["options"]:
            projection = projection_from_options(proj["name"], proj["options"])
        else:
            projection_from_options(proj["name"])  # an unknown name is an error here
        leaves = tuple(index[p] for p in g["leaves"])
        groups.append(Group(leaves, int(g["size"]), int(g["dim"]), int(g["offset"]), projection))
    labels = tuple(leaf["label"] for leaf in record["leaves"])
    collections = record["collections"]
    return Layout(
        spec,
        tuple(groups),
        labels,
        bool(record["said"]),
        None if collections is None else tuple(collections),
    )


def storable(a: Any) -> tuple[np.ndarray, str]:
    """``(array numpy can save without pickle, its dtype name)``: bf16 etc. as unsigned ints."""
    a = np.asarray(jax.device_get(a))
    dtype = a.dtype.name
    if a.dtype.kind == "V" or dtype not in np.sctypeDict:
        a = a.view(f"uint{8 * a.dtype.itemsize}")
    return a, dtype


def restored(a: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of :func:`storable`."""
    want = jnp.dtype(dtype)
    return a if a.dtype == want else a.view(want)


def _flat_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    return [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


# --------------------------------------------------------------------------------- saving


def save_subspace(
    path: str | Path,
    sub: Subspace,
    trainable: Trainable | jax.Array,
    *,
    key: jax.Array | None = None,
    init_fn: Callable[[jax.Array], PyTree] | None = None,
    init_key: jax.Array | None = None,
    collections: Mapping[str, PyTree] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict:
    """Write a subspace model (one, not a batch) to ``path``, atomically and sealed.

    Args:
      path: the output file (``.npz`` is conventional); its folder must exist.
      sub: the :class:`~subspace_jax.Subspace`, as :func:`~subspace_jax.init_subspace` made it.
      trainable: its trained :class:`~subspace_jax.Trainable` (or just ``w``).
      key: the PRNG key ``init_subspace`` drew the projections from; without it (or when it
        does not rebuild them bit for bit) the projection states are stored (4 D d bytes for
        a dense P).
      init_fn: ``init_fn(key) -> variables``, the model's own initialisation (e.g.
        ``lambda k: model.init(k, x)``); with ``init_key``, theta0 is not stored when
        ``init_fn(init_key)`` reproduces it bit for bit (the loader checks its SHA-256).
      init_key: the key theta0 was initialised with.
      collections: the current pass-through collections (e.g. the trained
        ``{"batch_stats": ...}``); those not given are ``sub.other_collections``. All are
        stored.
      metadata: any JSON-serialisable dict, stored in the header as ``metadata``.

    Returns:
      The header written (see docs/compressed-format.md).

    Raises:
      ValueError: a batched subspace, a trainable that does not fit, non-finite values, an
        unregistered projection object, metadata that is not JSON.
    """
    trainable = as_trainable(sub.layout, trainable)
    leaves0 = jax.tree_util.tree_leaves(sub.theta0)
    if any(tuple(x.shape) != s.shape for x, s in zip(leaves0, sub.layout.spec.leaves, strict=True)):
        raise ValueError("save_subspace saves one model: index a batch of subspaces first")
    others = _merged_others(sub, collections)
    params = _to_params(sub, trainable, others)
    # The layout as the loader will have it: each projection rebuilt from its name and options.
    layout = layout_from_record(layout_record(sub.layout), sub.theta0, repr(str(path)))
    theta0, regen_notes = _what_rebuilds(sub, layout, key, init_fn, init_key)
    rebuilt_sub = _rebuild_sub(layout, theta0, key, stored_states=regen_notes["states"])
    rebuilt_sub = rebuilt_sub.replace(other_collections=others)
    if not trees_equal(_to_params(rebuilt_sub, trainable, others), params):
        raise ValueError(
            "the saved file would not rebuild this model: its projection cannot be rebuilt "
            "from its name and options (register the projection object under its own name)"
        )
    arrays, dtypes = subspace_arrays(sub, trainable, others, regen_notes)
    bad = non_finite(arrays)
    if bad:
        raise ValueError(f"non-finite values in {', '.join(bad)}: {str(path)!r} was not written")
    header = {
        "format": FORMAT,
        "version": VERSION,
        **subspace_fields(sub, key, init_key, others, regen_notes, arrays, dtypes, params),
    }
    if metadata is not None:
        header["metadata"] = json.loads(json.dumps(dict(metadata)))
    write_archive(path, header, arrays)
    return header


def _merged_others(sub: Subspace, collections: Mapping[str, PyTree] | None) -> dict:
    others = dict(sub.other_collections)
    unknown = set(collections or {}) - set(others)
    if unknown:
        raise ValueError(
            f"collections {sorted(unknown)} are not pass-through collections of this subspace; "
            f"those are {sorted(others)}"
        )
    others.update(collections or {})
    return others


def _what_rebuilds(sub, layout: Layout, key, init_fn, init_key) -> tuple[PyTree, dict]:
    """theta0 as the loader will have it, and what must be stored (``notes``, ``states``)."""
    theta0 = sub.theta0
    theta0_ok = False
    if init_fn is not None and init_key is not None:
        variables = init_fn(init_key)
        projected = _projected(variables, sub.layout)
        theta0_ok = trees_equal(projected, sub.theta0)
    elif (init_fn is None) != (init_key is None):
        raise ValueError("give init_fn and init_key together (or neither: theta0 is stored)")
    states_ok = False
    if key is not None:
        regen = _rebuild_sub(layout, theta0, key)
        states_ok = trees_equal(regen.proj_states, sub.proj_states)
    notes = []
    if not theta0_ok:
        notes.append(
            "theta0 is stored (4 D bytes): "
            + ("no init_fn and init_key" if init_fn is None else "init_fn(init_key) differs")
        )
    if not states_ok and sub.layout.groups:
        notes.append(
            "the projection states are stored: "
            + ("no key" if key is None else "the key does not rebuild them")
        )
    return theta0, {
        "theta0_ok": theta0_ok,
        "states_ok": states_ok or not sub.layout.groups,
        "notes": notes,
        "states": None if states_ok else sub.proj_states,
    }


def _projected(variables: PyTree, layout: Layout) -> PyTree:
    if layout.collections is None:
        return variables
    return split_collections(variables, layout.collections)[0]


def _rebuild_sub(layout: Layout, theta0: PyTree, key, stored_states=None) -> Subspace:
    """The subspace through ``theta0``: projections from ``key`` or the stored states."""
    if stored_states is not None or not layout.groups:
        return Subspace(theta0=theta0, proj_states=tuple(stored_states or ()), layout=layout)
    return init_from_layout(key, theta0, layout)


def subspace_arrays(sub, trainable: Trainable, others: dict, regen: dict):
    """The file's arrays (by name) and their dtype names."""
    arrays, dtypes = {}, {}

    def put(name, x):
        arrays[name], dtypes[name] = storable(x)

    put("w", trainable.w)
    if sub.layout.said:
        put("said", trainable.scales if trainable.scales is not None else jnp.ones(0))
    for j, leaf in enumerate(trainable.direct):
        put(f"direct_{j}", leaf)
    if not regen["theta0_ok"]:
        for j, leaf in enumerate(jax.tree_util.tree_leaves(sub.theta0)):
            put(f"theta0_{j}", leaf)
    if not regen["states_ok"]:
        for g, state in enumerate(sub.proj_states):
            for k, leaf in enumerate(jax.tree_util.tree_leaves(state)):
                put(f"proj_{g}_{k}", leaf)
    for j, (_, leaf) in enumerate(_flat_with_paths(others)):
        put(f"other_{j}", leaf)
    return arrays, dtypes


def subspace_fields(sub, key, init_key, others, regen, arrays, dtypes, params) -> dict:
    """The version 3 header fields every saved model has (both writers)."""
    return {
        "prng": prng_settings(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "platform": platform_record(),
        "keys": {"projection": key_record(key), "init": key_record(init_key)},
        "layout": layout_record(sub.layout),
        "others": [
            {"path": p, "shape": list(np.shape(x)), "dtype": np.dtype(x.dtype).name}
            for p, x in _flat_with_paths(others)
        ],
        "dtypes": dtypes,
        "num_params": int(sub.layout.num_params),
        "theta0_sha256": params_digest(sub.theta0),
        "theta0_reproducible": bool(regen["theta0_ok"]),
        "projection_reproducible": bool(regen["states_ok"]),
        "stored": sorted(arrays),
        "notes": regen["notes"],
        "params_sha256": params_digest(params),
        "params_probe": params_probe(params),
    }


# -------------------------------------------------------------------------------- loading


def load_subspace(
    path: str | Path, init: Callable[[jax.Array], PyTree] | PyTree
) -> tuple[Subspace, Trainable, dict]:
    """Rebuild a saved subspace model: ``to_params(sub, trainable)`` gives its variables.

    Args:
      path: a file written by :func:`save_subspace` (or a version 3 compressed model).
      init: the model's init function ``init(key) -> variables`` (called with the saved init
        key; the result must reproduce the saved theta0, checked by its SHA-256), or a
        template of the variables (arrays or ``jax.ShapeDtypeStruct``s, e.g.
        ``jax.eval_shape(model.init, key, x)``) giving their tree structure: then theta0 must
        be stored in the file, or the template's arrays must be the saved theta0.

    Returns:
      ``(sub, trainable, info)``: the :class:`~subspace_jax.Subspace` (its
      ``other_collections`` are the saved ones, e.g. the trained ``batch_stats``), the
      :class:`~subspace_jax.Trainable`, and ``info``: the header plus ``params_match``,
      ``params_distance``, ``digest_verified``, ``platform_differences`` and ``file_bytes`` (as
      :func:`~subspace_jax.compress.load_compressed`).

    Raises:
      FileNotFoundError: no such file.
      CompressedModelError: a damaged or altered file, a model whose parameters are not the
        saved ones, an init function that does not rebuild theta0, an unknown projection.
    """
    header, arrays, has_digest = read_archive(path)
    name = repr(str(path))
    _check_subspace_header(header, arrays, name)
    arrays = {k: restored(a, header["dtypes"].get(k, a.dtype.name)) for k, a in arrays.items()}
    variables = _variables(header, init, name)
    layout = _layout(header, variables, name)
    theta0 = _theta0(header, arrays, variables, layout, name)
    states = stored_states(header, arrays, layout, name)
    key = header["keys"]["projection"]
    sub = _rebuild_sub(layout, theta0, None if key is None else key_from_record(key), states)
    sub = sub.replace(other_collections=stored_others(header, arrays, variables, layout, name))
    check_finite(sub)
    trainable = trainable_from_arrays(arrays, layout, name)
    params = _to_params(sub, trainable, sub.other_collections)
    info = dict(header)
    info["params_match"] = params_digest(params) == header["params_sha256"]
    info["params_distance"] = 0.0
    info["digest_verified"] = has_digest
    info["platform_differences"] = diffs = platform_differences(header)
    info["file_bytes"] = Path(path).stat().st_size
    if not info["params_match"]:
        check_rebuilt(name, header, params, diffs, info)
    return sub, trainable, info


def _check_subspace_header(header: dict, arrays: dict, name: str) -> None:
    if header["version"] < 3:
        raise CompressedModelError(
            f"compressed model {name} is a format version {header['version']} file of a "
            "built-in model: load it with subspace_jax.compress.load_compressed"
        )
    check_fields(header, SUBSPACE_FIELDS, name, "header")
    check_fields(header["layout"], {"leaves": list, "groups": list}, name, "header's layout")
    check_probe(header, name)
    check_arrays(header, arrays, name)


def _variables(header: dict, init, name: str) -> PyTree:
    if callable(init):
        record = header["keys"]["init"]
        if record is None:
            raise CompressedModelError(
                f"compressed model {name} was saved without an init key: pass a template of "
                "the variables (e.g. jax.eval_shape(model.init, key, x)) instead of init_fn"
            )
        return init(key_from_record(record))
    if init is None:
        raise ValueError("load_subspace needs the model's init function or a template")
    return init


def _layout(header: dict, variables: PyTree, name: str) -> Layout:
    collections = header["layout"].get("collections")
    try:
        projected = (
            variables
            if collections is None
            else split_collections(variables, tuple(collections))[0]
        )
        return layout_from_record(header["layout"], projected, name)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CompressedModelError):
            raise
        raise CompressedModelError(
            f"compressed model {name}: its layout does not fit the model ({type(e).__name__}: {e})"
        ) from None


def _theta0(header, arrays, variables, layout: Layout, name: str) -> PyTree:
    treedef = layout.spec.treedef
    if not header["theta0_reproducible"]:
        n = len(layout.spec.leaves)
        leaves = [jnp.asarray(need(arrays, f"theta0_{j}", name)) for j in range(n)]
        return jax.tree_util.tree_unflatten(treedef, leaves)
    projected = _projected(variables, layout)
    leaves = jax.tree_util.tree_leaves(projected)
    if not all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
        raise CompressedModelError(
            f"compressed model {name} does not store theta0: pass the init function it was "
            "saved with (or the theta0 arrays themselves), not a template of shapes"
        )
    theta0 = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
    if params_digest(theta0) != header["theta0_sha256"]:
        raise CompressedModelError(
            f"compressed model {name}: the init function (or arrays) given does not rebuild "
            "the saved theta0 (its SHA-256 differs): another model, init or key"
        )
    return theta0


def stored_states(header, arrays, layout: Layout, name: str) -> tuple | None:
    """The projection states from the file's ``proj_<g>_<k>`` (None when regenerated)."""
    if header["projection_reproducible"]:
        return None
    states = []
    for g, grp in enumerate(layout.groups):
        proj = get_projection(grp.projection)
        template = jax.eval_shape(
            lambda k, p=proj, gr=grp: p.init(k, gr.size, gr.dim), jax.random.key(0)
        )
        leaves, treedef = jax.tree_util.tree_flatten(template)
        got = [jnp.asarray(need(arrays, f"proj_{g}_{k}", name)) for k in range(len(leaves))]
        for k, (t, a) in enumerate(zip(leaves, got, strict=True)):
            if tuple(t.shape) != a.shape:
                raise CompressedModelError(
                    f"compressed model {name}: proj_{g}_{k} has shape {a.shape}, expected {t.shape}"
                )
        states.append(jax.tree_util.tree_unflatten(treedef, got))
    return tuple(states)


def stored_others(header, arrays, variables, layout: Layout, name: str) -> dict:
    """The model state stored as ``other_<j>`` arrays, in the tree of ``variables`` (values or
    shapes) minus its projected collections; {} for a model without state."""
    if layout.collections is None:
        return {}
    _, others, _ = split_collections(variables, layout.collections)
    paths = _flat_with_paths(others)
    want = [(o["path"], tuple(o["shape"])) for o in header["others"]]
    if [(p, tuple(np.shape(x))) for p, x in paths] != want:
        raise CompressedModelError(
            f"compressed model {name}: the model's other collections are not the saved ones"
        )
    treedef = jax.tree_util.tree_structure(others)
    leaves = [jnp.asarray(need(arrays, f"other_{j}", name)) for j in range(len(paths))]
    return dict(jax.tree_util.tree_unflatten(treedef, leaves))


def need(arrays: Mapping[str, np.ndarray], key: str, name: str) -> np.ndarray:
    """``arrays[key]``, or an error naming the file and the missing array."""
    if key not in arrays:
        raise CompressedModelError(f"compressed model {name} lacks the array {key!r}")
    return arrays[key]


def trainable_from_arrays(arrays, layout: Layout, name: str) -> Trainable:
    n = len(layout.direct_leaves)
    direct = tuple(jnp.asarray(need(arrays, f"direct_{j}", name)) for j in range(n))
    scales = jnp.ones((0,), jnp.float32)
    if layout.said:
        scales = jnp.asarray(need(arrays, "said", name))
    w = jnp.asarray(need(arrays, "w", name))
    try:
        return as_trainable(layout, Trainable(w=w, direct=direct, scales=scales))
    except (KeyError, ValueError) as e:
        raise CompressedModelError(
            f"compressed model {name}: its arrays do not fit the model ({e})"
        ) from None
