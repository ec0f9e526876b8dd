"""Seeds, batches and parameters over a device mesh (``jax.sharding``), on one host or many.

The training step needs no change to run on many devices: placed with
:class:`~jax.sharding.NamedSharding`, its arguments tell ``jax.jit`` (GSPMD) how to split the
work. This module decides the placements over a mesh with up to three axes:

* ``"seeds"``: the leading (seed) axis of the seed-batched state (subspaces, trainable
  variables, optimiser states): each device trains its own seeds;
* ``"data"``: the batch axis of the inputs (data parallel); the gradient's mean over the batch
  becomes a cross-device reduction, so results agree with one device to float tolerance;
* ``"params"``: for large models, theta0 and the projection state split along their
  parameter dimension (``D``). Projection states are padded so that any ``D`` splits evenly
  (dense rows and sparse non-zeros with zeros, Fastfood with blocks of zero scale,
  orthogonal_hadamard with identity coordinates); the padding never reaches the model, as
  :func:`~subspace_jax.to_params` reads only the first ``D`` entries of ``P w``. A leaf of
  theta0 is split along its first axis that divides evenly and replicated otherwise.

Replicated placement is the default for small states: ``params`` is 1 unless asked for.

Multi-host: after :func:`initialize_distributed` (``jax.distributed.initialize``), a mesh
spans every process's devices; :func:`shard_batch` builds each global batch from the rows the
process's own devices hold (each process feeds only its share) and :func:`fetch` gathers
sharded results back to every host. The data axis runs across processes first, so with as
many data shards as processes each process feeds its own slice of every batch.

Known limitation: the projections' ``subspace_linear_map`` primitive does not mark its output
as varying under ``shard_map``; placements with ``jit`` (as here) are not affected.

Example:
  >>> import jax
  >>> mesh = make_mesh(jax.devices(), num_seeds=4, batch_size=128)  # doctest: +SKIP
  >>> subs, trainables = place_state(mesh, subs, trainables)  # doctest: +SKIP
  >>> x, y = shard_batch(mesh, x, y)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from subspace_jax._errors import UserError

PyTree = Any
#: The mesh axes, outermost first.
AXES = ("seeds", "data", "params")
#: The ``mesh`` a result records for a run on one device.
SINGLE = {"seeds": 1, "data": 1, "params": 1}


# --------------------------------------------------------------------------------------------
# Layout: how many devices on each axis (pure, no devices needed)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Requested axis sizes; None lets :func:`resolve_layout` choose.

    Attributes:
      seeds: devices along the seed axis (None: ``gcd(number of seeds, devices)``).
      data: devices along the batch axis (None: the devices left).
      params: devices along the parameter axis (default 1: states replicated).
    """

    seeds: int | None = None
    data: int | None = None
    params: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_mesh(text: str) -> MeshSpec:
    """Parse ``"seeds=S,data=B[,params=P]"`` (any order, each at most once).

    Raises:
      ValueError: an unknown axis, a repeated one, or a size that is not an integer >= 1.
    """
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise UserError(
                f"--mesh takes 'seeds=S,data=B[,params=P]' (axes {', '.join(AXES)}), got {text!r}"
            )
        if name in sizes:
            raise UserError(f"--mesh names the axis {name!r} twice: {text!r}")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise UserError(f"--mesh axis {name} must be an integer >= 1, got {value.strip()!r}")
        sizes[name] = size
    return MeshSpec(**sizes)


def resolve_layout(
    num_devices: int, spec: MeshSpec, num_seeds: int, batch_size: int | None = None
) -> tuple[int, int, int]:
    """The ``(seeds, data, params)`` axis sizes for ``num_seeds`` seeds on ``num_devices``.

    Rules (documented in docs/scaling.md): the product is always ``num_devices``; the seed
    axis must divide the number of seeds trained together. A seed axis chosen by the user
    that does not divide ``num_seeds`` (a sweep round or a retry with fewer seeds) shrinks to
    ``gcd(num_seeds, seeds)`` and the freed devices join the data axis. Unset axes: ``seeds``
    takes ``gcd(num_seeds, devices / params)``, ``data`` the rest. A batch that the data axis
    does not divide is replicated (correct, but those devices repeat the work).

    Raises:
      ValueError: the given sizes do not multiply to ``num_devices``.
    """
    p = spec.params
    if num_devices % p:
        raise UserError(f"mesh params={p} does not divide the {num_devices} devices")
    rest = num_devices // p
    if spec.seeds is not None and spec.data is not None:
        if spec.seeds * spec.data * p != num_devices:
            raise UserError(
                f"mesh seeds={spec.seeds}, data={spec.data}, params={p} uses "
                f"{spec.seeds * spec.data * p} devices, but {num_devices} are in use "
                "(the product must equal the device count; see --devices)"
            )
        seeds = spec.seeds
    elif spec.seeds is not None:
        if rest % spec.seeds:
            raise UserError(
                f"mesh seeds={spec.seeds} does not divide the {rest} devices left by params={p}"
            )
        seeds = spec.seeds
    elif spec.data is not None:
        if rest % spec.data:
            raise UserError(
                f"mesh data={spec.data} does not divide the {rest} devices left by params={p}"
            )
        seeds = rest // spec.data
    else:
        seeds = math.gcd(num_seeds, rest)
    seeds = math.gcd(seeds, num_seeds)
    return seeds, rest // seeds, p


def check_mesh_spec(spec: MeshSpec, num_devices: int, num_seeds: int, batch_size: int) -> None:
    """Validate a user's ``--mesh`` against the run before anything trains.

    Raises:
      ValueError: the product is not the device count, the seed axis does not divide the
        number of seeds, or the data axis does not divide the batch size.
    """
    resolve_layout(num_devices, spec, num_seeds, batch_size)
    if spec.seeds is not None and num_seeds % spec.seeds:
        raise UserError(
            f"mesh seeds={spec.seeds} must divide the number of seeds ({num_seeds}): each "
            "device along the seed axis trains the same number of seeds"
        )
    data = spec.data
    if data is None and spec.seeds is not None:
        data = num_devices // (spec.seeds * spec.params)
    if data is not None and batch_size % data:
        raise UserError(f"mesh data={data} must divide the batch size ({batch_size})")


def make_mesh(
    devices: Sequence[jax.Device] | None = None,
    spec: MeshSpec | None = None,
    *,
    num_seeds: int = 1,
    batch_size: int | None = None,
) -> Mesh:
    """A ``("seeds", "data", "params")`` mesh over ``devices`` (default: every device).

    Devices are ordered by process, then by id; the data axis runs across processes first,
    then the seed axis, and the parameter axis stays inside a process (its collectives are
    the most frequent).
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda dev: (dev.process_index, dev.id))
    s, b, p = resolve_layout(len(devices), spec or MeshSpec(), num_seeds, batch_size)
    grid = np.array(devices, dtype=object).reshape(b, s, p).transpose(1, 0, 2)
    return Mesh(grid, AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"seeds": S, "data": B, "params": P}`` of a mesh (what result JSON records)."""
    return {name: int(mesh.shape[name]) for name in AXES}


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """Devices and a requested layout; the mesh of each run follows its number of seeds.

    Attributes:
      devices: the devices to use (all processes' devices in a multi-host run).
      spec: the requested axis sizes.
    """

    devices: tuple[jax.Device, ...]
    spec: MeshSpec = MeshSpec()

    def mesh_for(self, num_seeds: int, batch_size: int | None = None) -> Mesh:
        return make_mesh(self.devices, self.spec, num_seeds=num_seeds, batch_size=batch_size)


_DEFAULT_PLAN: list[MeshPlan | None] = [None]


def default_plan() -> MeshPlan | None:
    """The plan set by :func:`use_plan` (the CLI sets one), None when none is set."""
    return _DEFAULT_PLAN[0]


@contextlib.contextmanager
def use_plan(plan: MeshPlan | None) -> Iterator[MeshPlan | None]:
    """Make ``plan`` the default of :func:`~subspace_jax.train.train_and_evaluate` (and so of
    sweeps and searches, which call it) within the block."""
    old = _DEFAULT_PLAN[0]
    _DEFAULT_PLAN[0] = plan
    try:
        yield plan
    finally:
        _DEFAULT_PLAN[0] = old


def resolve_mesh(
    mesh: Mesh | MeshPlan | None, num_seeds: int, batch_size: int | None = None
) -> Mesh | None:
    """The mesh of a run: ``mesh`` itself, a plan's mesh for ``num_seeds``, or the default
    plan's; None (single device, no placement) when there is none or it has one device."""
    if mesh is None:
        mesh = default_plan()
    if isinstance(mesh, MeshPlan):
        if len(mesh.devices) == 1 and jax.process_count() == 1:
            return None
        mesh = mesh.mesh_for(num_seeds, batch_size)
    return mesh


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` placed with ``sharding``; across processes from the value every process holds."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: a reshard
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _spec(ndim: int, *, seeds: bool, param_axis: int | None = None) -> P:
    """A PartitionSpec: axis 0 on ``seeds`` (if batched), ``param_axis`` (unbatched) on params."""
    parts: list[str | None] = [None] * ndim
    off = 1 if seeds else 0
    if seeds and ndim:
        parts[0] = "seeds"
    if param_axis is not None:
        parts[param_axis + off] = "params"
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def shard_seeds(mesh: Mesh, tree: PyTree) -> PyTree:
    """Place every leaf of a seed-batched tree with its leading axis along ``"seeds"``.

    Leaves: ``(N, ...)`` with ``N`` a multiple of the mesh's seed axis; scalars are replicated.
    """
    return jax.tree_util.tree_map(
        lambda x: _put(x, NamedSharding(mesh, _spec(np.ndim(x), seeds=True))), tree
    )


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Place every leaf of ``tree`` on every device of ``mesh``."""
    return jax.tree_util.tree_map(lambda x: _put(x, NamedSharding(mesh, P())), tree)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Axis 0 along ``"data"`` when the data axis divides it, else replicated."""
    data = mesh.shape["data"]
    if len(shape) and data > 1 and shape[0] % data == 0:
        return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh | None, *arrays: Any) -> Any:
    """Place host arrays (a batch, or a whole dataset) with axis 0 along ``"data"``.

    Each process copies to its devices only the rows they hold (its share). With ``mesh``
    None the arrays are returned unchanged. Returns one array for one argument, else a tuple.
    """
    if mesh is None:
        out = arrays
    else:
        out = []
        for x in arrays:
            sharding = batch_sharding(mesh, np.shape(x))
            if sharding.is_fully_addressable or not isinstance(x, np.ndarray):
                out.append(_put(x, sharding))
            else:
                out.append(jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i]))
        out = tuple(out)
    return out[0] if len(out) == 1 else tuple(out)


def shard_chunk(mesh: Mesh, *arrays: Any) -> tuple:
    """Place a chunk of stacked batches, ``(L, B, ...)`` host arrays, with ``B`` along
    ``"data"`` (when the data axis divides it, else replicated); 1-D arrays are replicated.

    Each process copies to its devices only the rows they hold.
    """
    data = mesh.shape["data"]
    out = []
    for x in arrays:
        split = np.ndim(x) >= 2 and data > 1 and np.shape(x)[1] % data == 0
        out.append(_put(x, NamedSharding(mesh, P(None, "data") if split else P())))
    return tuple(out)


# ---- parameter axis: padding each projection state so that any D splits evenly ----------

#: ``type -> fn(state, multiple) -> (padded state, axes)`` with ``axes`` one int (the leaf's
#: split axis, unbatched) or None (replicated) per leaf of the state, in flatten order.
StateSplitter = Callable[[Any, int], tuple[Any, list[int | None]]]
_SPLITTERS: dict[type, StateSplitter] = {}


def register_state_sharding(cls: type, splitter: StateSplitter) -> None:
    """Teach :func:`shard_subspace` how to split (and pad) a projection state type.

    ``splitter(state, multiple)`` gets one unbatched state and returns it padded so that the
    split axis of each leaf is a multiple of ``multiple`` (the padding must leave the first
    ``D`` entries of ``apply`` and all of ``transpose`` unchanged) and, per leaf in flatten
    order, the axis to split or None. States of unregistered types are replicated.
    """
    _SPLITTERS[cls] = splitter


def _pad_to(x: jax.Array, axis: int, multiple: int, fill: Any = 0) -> jax.Array:
    """``x`` with ``axis`` padded at the end to a multiple of ``multiple`` with ``fill``
    (a scalar, or a function of the number of pad entries giving the pad along ``axis``)."""
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[axis] = extra
    if callable(fill):
        pad = fill(n, extra).astype(x.dtype)
        if pad.ndim == 1:  # values along ``axis``, the same across the other axes
            pad = jnp.moveaxis(pad.reshape(-1, *[1] * (x.ndim - 1)), 0, axis)
        pad = jnp.broadcast_to(pad, shape)
    else:
        pad = jnp.full(shape, fill, x.dtype)
    return jnp.concatenate([x, pad], axis=axis)


def _iota(start: int, extra: int) -> jax.Array:
    return jnp.arange(start, start + extra, dtype=jnp.int32)


def _dense_split(state, multiple):
    return state.replace(matrix=_pad_to(state.matrix, 0, multiple)), [0, None]


def _fastfood_split(state, multiple):
    nb, n = state.gauss.shape
    if nb < multiple:  # one block (d > D / 2) or few: padding would multiply the work
        return state, [None] * 5

    def block_iota(start, extra):  # padded blocks: identity permutations
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (extra, n))

    def flat_iota(start, extra):  # inverse permutations index the flat (nb2 * n,) array
        return jnp.arange(start * n, (start + extra) * n, dtype=jnp.int32).reshape(extra, n)

    shared = state.signs.shape[0] == 1
    padded = state.replace(
        signs=state.signs if shared else _pad_to(state.signs, 0, multiple, 1.0),
        gauss=_pad_to(state.gauss, 0, multiple),
        perm=_pad_to(state.perm, 0, multiple, block_iota),
        inv_perm=_pad_to(state.inv_perm, 0, multiple, flat_iota),
        scale=_pad_to(state.scale, 0, multiple),  # zero scale: padded rows are 0
    )
    return padded, [None if shared else 0, 0, 0, 0, 0]


def _orth_hadamard_split(state, multiple):
    # Extra coordinates D.. are fixed points of every round (identity permutation, sign +1,
    # outside both Hadamard windows), so the first D outputs are unchanged.
    return state.replace(
        perm=_pad_to(state.perm, 1, multiple, _iota),
        inv_perm=_pad_to(state.inv_perm, 1, multiple, _iota),
        signs=_pad_to(state.signs, 2, multiple, 1.0),
    ), [1, 1, 2]


def _triplet_split(state, multiple):
    # Padded non-zeros: value 0 at (D - 1, d - 1), which keeps row- and column-sorted orders.
    return state.replace(
        rows=_pad_to(state.rows, 0, multiple, state.D - 1),
        cols=_pad_to(state.cols, 0, multiple, state.d - 1),
        vals=_pad_to(state.vals, 0, multiple),
    ), [0, 0, 0]


def _column_split(state, multiple):
    return state.replace(
        rows=_pad_to(state.rows, 1, multiple), vals=_pad_to(state.vals, 1, multiple)
    ), [1, 1]


def _bcoo_split(state, multiple):
    leaves, treedef = jax.tree_util.tree_flatten(state)  # (data (nse,), indices (nse, 2))
    return jax.tree_util.tree_unflatten(treedef, [_pad_to(x, 0, multiple) for x in leaves]), [
        0
    ] * len(leaves)


def _register_builtin() -> None:
    from jax.experimental import sparse as jsparse

    from subspace_jax.projections._dense import DenseState
    from subspace_jax.projections._fastfood import FastfoodState, OrthogonalHadamardState
    from subspace_jax.projections._sparse_formats import ColumnState, TripletState

    register_state_sharding(DenseState, _dense_split)
    register_state_sharding(FastfoodState, _fastfood_split)
    register_state_sharding(OrthogonalHadamardState, _orth_hadamard_split)
    register_state_sharding(TripletState, _triplet_split)
    register_state_sharding(ColumnState, _column_split)
    register_state_sharding(jsparse.BCOO, _bcoo_split)


_register_builtin()


def split_state(state: Any, multiple: int, *, batched: bool = False) -> tuple[Any, list]:
    """A projection state padded for ``multiple`` parameter shards, and each leaf's split axis.

    Args:
      state: one projection state, or (``batched``) a seed-batched one.
      multiple: the parameter axis size.

    Returns:
      ``(padded, axes)``; unregistered types come back unchanged and replicated.
    """
    splitter = _SPLITTERS.get(type(state))
    n_leaves = len(jax.tree_util.tree_leaves(state))
    if splitter is None or multiple == 1:
        return state, [None] * n_leaves
    if not batched:
        return splitter(state, multiple)
    axes: list = []

    def one(s):  # traced once: the axes are static
        padded, a = splitter(s, multiple)
        axes[:] = a
        return padded

    return jax.vmap(one)(state), axes


def _leaf_param_axis(shape: Sequence[int], multiple: int) -> int | None:
    """The first axis of a theta0 leaf that ``multiple`` divides (None: replicate)."""
    if multiple == 1:
        return None
    for axis, n in enumerate(shape):
        if n >= multiple and n % multiple == 0:
            return axis
    return None


def shard_subspace(mesh: Mesh, sub: Any, *, batched: bool = True) -> Any:
    """Place a :class:`~subspace_jax.Subspace` (seed-batched when ``batched``) on ``mesh``.

    Seeds along ``"seeds"``; with a ``"params"`` axis larger than 1, projection states
    padded and split along it (:func:`split_state`) and theta0 leaves split along their first
    evenly divisible axis.
    """
    multiple = int(mesh.shape["params"])
    off = 1 if batched else 0

    def put(x, axis):
        return _put(x, NamedSharding(mesh, _spec(np.ndim(x), seeds=batched, param_axis=axis)))

    theta0 = jax.tree_util.tree_map(
        lambda x: put(x, _leaf_param_axis(np.shape(x)[off:], multiple)), sub.theta0
    )
    states = []
    for state in sub.proj_states:
        padded, axes = split_state(state, multiple, batched=batched)
        leaves, treedef = jax.tree_util.tree_flatten(padded)
        placed = [put(x, a) for x, a in zip(leaves, axes, strict=True)]
        states.append(jax.tree_util.tree_unflatten(treedef, placed))
    others = jax.tree_util.tree_map(
        lambda x: put(x, None) if batched else _put(x, NamedSharding(mesh, P())),
        sub.other_collections,
    )
    return sub.replace(theta0=theta0, proj_states=tuple(states), other_collections=others)


def place_state(mesh: Mesh | None, subs: Any, *trees: PyTree) -> tuple:
    """Place the seed-batched training state: subspaces (:func:`shard_subspace`) and the
    other trees (trainable variables, optimiser states, divergence records) along seeds.

    With ``mesh`` None everything is returned unchanged.
    """
    if mesh is None:
        return (subs, *trees)
    return (shard_subspace(mesh, subs), *(shard_seeds(mesh, t) for t in trees))


def fetch(tree: PyTree) -> PyTree:
    """``jax.device_get`` that also works for arrays spread over several processes.

    An array that is not fully addressable (a multi-host mesh) is all-gathered, so every
    process gets the whole value; every process must call this in the same order.
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree_util.tree_map(get, tree)


# --------------------------------------------------------------------------------------------
# A sharded training step
# --------------------------------------------------------------------------------------------


def sharded_train_step(step: Callable, mesh: Mesh) -> Callable:
    """A seed-vmapped, sharded training step: the single-device result on ``mesh``.

    Args:
      step: one seed's pure ``step(sub, trainable, opt_state, x, y) -> (trainable, opt_state,
        loss, acc)``, e.g. :func:`~subspace_jax.train.make_train_step`'s.
      mesh: the mesh (:func:`make_mesh`).

    Returns:
      ``sharded(subs, trainables, opt_states, x, y) -> (trainables, opt_states, loss, acc)``
      over seed-batched state (leading axis = seed) and one batch for all seeds. It places
      its arguments (a no-op for those already placed: :func:`place_state` once, then
      :func:`shard_batch` per batch) and runs under ``jax.jit``, trainables and optimiser
      states donated; every output keeps its leading seed axis along ``"seeds"``, so feeding
      the outputs back never recompiles. The results equal the single-device step's to float
      tolerance.

    Example:
      >>> step = sharded_train_step(make_train_step(model.apply, opt), mesh)  # doctest: +SKIP
      >>> t, o, loss, acc = step(subs, t, o, x, y)  # doctest: +SKIP
    """
    batched = jax.vmap(step, in_axes=(0, 0, 0, None, None))
    jitted = jax.jit(batched, out_shardings=NamedSharding(mesh, P("seeds")), donate_argnums=(1, 2))

    def sharded(subs, trainables, opt_states, x, y):
        if not _placed(subs, mesh):
            subs = shard_subspace(mesh, subs)
        if not _placed((trainables, opt_states), mesh):
            trainables, opt_states = shard_seeds(mesh, (trainables, opt_states))
        x, y = shard_batch(mesh, x, y)
        return jitted(subs, trainables, opt_states, x, y)

    return sharded


def _placed(tree: PyTree, mesh: Mesh) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and all(
        isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
        for x in leaves
    )


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize``, with gloo collectives when the devices are CPUs.

    With no arguments, JAX's own cluster detection (SLURM, ...) fills them in. Must run
    before anything else touches a JAX device.
    """
    platforms = (os.environ.get("JAX_PLATFORMS") or "").lower()
    if "cpu" in platforms or not _has_accelerator_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator is not None:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)


def _has_accelerator_plugin() -> bool:
    """Whether a GPU/TPU JAX plugin is installed (checked without starting a backend)."""
    import importlib.util

    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
    )


def local_plan(devices: int | None = None, spec: MeshSpec | None = None) -> MeshPlan:
    """Every device of every process (or the first ``devices``, taken evenly per process).

    Raises:
      ValueError: ``devices`` out of range, or not a multiple of the number of processes.
    """
    all_devices = sorted(jax.devices(), key=lambda dev: (dev.process_index, dev.id))
    nproc = jax.process_count()
    if devices is not None:
        if not 1 <= devices <= len(all_devices):
            raise UserError(
                f"--devices must be in 1..{len(all_devices)} (the devices available), got {devices}"
            )
        if devices % nproc:
            raise UserError(
                f"--devices {devices} must be a multiple of the number of processes ({nproc})"
            )
        per = devices // nproc
        all_devices = [
            d for p in range(nproc) for d in [x for x in all_devices if x.process_index == p][:per]
        ]
    return MeshPlan(tuple(all_devices), spec or MeshSpec())
