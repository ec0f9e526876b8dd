"""Models by name: a registry of architectures and a builder returning pure ``init / apply``.

``build_model(name, input_shape, num_classes, **overrides)`` returns a :class:`ModelDef`
whose ``config`` records every resolved setting, so ``from_config(config)`` (or
``build_model(**config)``) rebuilds the same model, and the same key gives the same
parameters. ``small_model_grid`` lists small direct models spanning about 1k to 60k
parameters, for comparing them with subspace training at equal parameter counts.

Registered models (defaults in brackets; every setting can be overridden):

- ``mlp`` [``hidden=[200]``]: 784-200-10 on MNIST, 159,010 parameters.
- ``mlp2`` [``hidden=[200, 200]``]: 784-200-200-10 on MNIST, 199,210 parameters.
- ``lenet`` [``features=[6, 16], kernel_size=5, stride=1, hidden=[120, 84], pool=2``]:
  LeNet-5, 61,706 parameters on 32x32x1, 62,006 on 32x32x3, 44,426 on 28x28x1.
- ``mlp_small`` [``width=10, depth=1``]: ``depth`` hidden layers of ``width`` units; with
  ``depth=1``, ``(H*W*C + num_classes + 1) * width + num_classes`` parameters (7,960 on MNIST).
- ``lenet_small`` [``features=[2, 4], hidden=[32, 16]``, kernel 5, stride 1, pool 2]: a LeNet
  whose channels, kernel, stride, hidden widths and pooling are all set by overrides; 3,034
  parameters on 28x28x1 by default.
- ``resnet20`` [``blocks=3, widths=[16, 32, 64]``] and ``resnet32`` [``blocks=5``]: the CIFAR
  ResNets of He et al. (2016) with BatchNorm and option-A (parameter-free) shortcuts, 269,722
  and 464,154 parameters on CIFAR-10; their BatchNorm running statistics are model state
  (``ModelDef.state_collections == ("batch_stats",)``), not parameters.
- ``vit`` [``patch=4, embed_dim=128, depth=6, heads=4, mlp_dim=256``]: a small Vision
  Transformer for 32x32 inputs (64 patches of 4x4 and a class token), 811,146 parameters on
  CIFAR-10.

Models with state (the ResNets' ``batch_stats``): ``init(key)`` returns every collection,
``apply(variables, x)`` evaluates with the running statistics, and
``apply(variables, x, train=True)`` returns ``(logits, updates)``, the batch-statistics
forward pass and the updated collections (``{}`` for a model without state).

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = build_model("mlp", (28, 28, 1), 10)
  >>> model.num_params
  159010
  >>> params = model.init(jax.random.key(0))
  >>> model.apply(params, jnp.zeros((3, 28, 28, 1))).shape
  (3, 10)
  >>> from_config(model.config).num_params
  159010
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from subspace_jax._errors import UserError
from subspace_jax.models._lenet import LeNet, lenet_spatial_sizes
from subspace_jax.models._mlp import MLP
from subspace_jax.models._resnet import ResNet
from subspace_jax.models._vit import ViT

PyTree = Any

#: Default parameter budgets of :func:`small_model_grid` (about 1k to 60k).
DEFAULT_GRID_TARGETS: tuple[int, ...] = (1_000, 2_000, 4_000, 8_000, 15_000, 30_000, 60_000)

#: Which registered model each :func:`small_model_grid` kind builds.
GRID_MODELS: Mapping[str, str] = types.MappingProxyType(
    {"mlp": "mlp_small", "lenet": "lenet_small"}
)


class ModelDef(NamedTuple):
    """A built model as pure functions.

    Attributes:
      name: registry name.
      module: the Flax module.
      init: ``init(key) -> params``, the variables dict ``{"params": {...}}`` of a dummy batch
        of shape ``(1, *input_shape)`` (plus ``"batch_stats"`` for a model with state).
      apply: ``apply(params, x) -> logits``, ``x`` of shape ``(N, *input_shape)``, logits of
        shape ``(N, num_classes)``, in evaluation mode (running statistics). Pure, so it can
        be jitted, vmapped and differentiated. ``apply(params, x, train=True)`` returns
        ``(logits, updates)``: training mode, with the updated state collections.
      num_params: total number of parameters D (the ``params`` collection; model state such
        as BatchNorm statistics is not counted).
      config: JSON-serialisable settings (``name``, ``input_shape``, ``num_classes`` and every
        resolved override); ``from_config(config)`` rebuilds the model.
      head: the leaf-path prefix of the classifier layer (``"params/head"``,
        ``"params/Dense_2"``): the leaves ``--reinit-head`` draws afresh.
      state_collections: the mutable collections ``apply(..., train=True)`` updates
        (``("batch_stats",)`` for the ResNets, ``()`` otherwise).
    """

    name: str
    module: nn.Module
    init: Callable[[jax.Array], PyTree]
    apply: Callable[[PyTree, jax.Array], jax.Array]
    num_params: int
    config: dict[str, Any]
    head: str | None = None
    state_collections: tuple[str, ...] = ()


class ModelSpec(NamedTuple):
    """A registry entry: which family builds it and its default settings."""

    family: str
    defaults: Mapping[str, Any]
    description: str


_LENET_DEFAULTS = {
    "features": [6, 16],
    "kernel_size": 5,
    "stride": 1,
    "hidden": [120, 84],
    "pool": 2,
}

MODELS: Mapping[str, ModelSpec] = types.MappingProxyType(
    {
        "mlp": ModelSpec("mlp", {"hidden": [200]}, "MLP with one hidden layer of 200 units"),
        "mlp2": ModelSpec("mlp", {"hidden": [200, 200]}, "MLP with two hidden layers of 200"),
        "lenet": ModelSpec("lenet", dict(_LENET_DEFAULTS), "LeNet-5"),
        "mlp_small": ModelSpec(
            "mlp_small", {"width": 10, "depth": 1}, "MLP with `depth` hidden layers of `width`"
        ),
        "lenet_small": ModelSpec(
            "lenet",
            {**_LENET_DEFAULTS, "features": [2, 4], "hidden": [32, 16]},
            "LeNet with configurable channels, kernel, stride, hidden widths and pooling",
        ),
        "resnet20": ModelSpec(
            "resnet",
            {"blocks": 3, "widths": [16, 32, 64]},
            "CIFAR ResNet-20 (He et al. 2016): BatchNorm, option-A shortcuts",
        ),
        "resnet32": ModelSpec(
            "resnet",
            {"blocks": 5, "widths": [16, 32, 64]},
            "CIFAR ResNet-32 (He et al. 2016): BatchNorm, option-A shortcuts",
        ),
        "vit": ModelSpec(
            "vit",
            {"patch": 4, "embed_dim": 128, "depth": 6, "heads": 4, "mlp_dim": 256},
            "small Vision Transformer for 32x32 inputs (patch 4, class token)",
        ),
    }
)

#: Families whose modules take ``train`` and keep BatchNorm statistics in ``batch_stats``.
_STATEFUL = {"resnet": ("batch_stats",)}


def model_names() -> tuple[str, ...]:
    """Names accepted by :func:`build_model`, sorted."""
    return tuple(sorted(MODELS))


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(key: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return int(value)


def _int_list(key: str, value: Any, *, min_len: int) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{key} must be a list of integers >= 1 (length >= {min_len}), got {value!r}"
        )
    if len(value) < min_len or not all(_is_int(v) and v >= 1 for v in value):
        raise ValueError(
            f"{key} must be a list of integers >= 1 (length >= {min_len}), got {value!r}"
        )
    return [int(v) for v in value]


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "hidden": lambda k, v: _int_list(k, v, min_len=0),
    "features": lambda k, v: _int_list(k, v, min_len=1),
    "kernel_size": _positive_int,
    "stride": _positive_int,
    "pool": _positive_int,
    "width": _positive_int,
    "depth": _positive_int,
    "blocks": _positive_int,
    "widths": lambda k, v: _int_list(k, v, min_len=1),
    "patch": _positive_int,
    "embed_dim": _positive_int,
    "heads": _positive_int,
    "mlp_dim": _positive_int,
}


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, Sequence)
        or len(input_shape) != 3
        or not all(_is_int(n) and n >= 1 for n in input_shape)
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels), three integers >= 1, "
            f"got {input_shape!r}"
        )
    return tuple(int(n) for n in input_shape)  # type: ignore[return-value]


def _resolve(name: str, overrides: Mapping[str, Any]) -> tuple[ModelSpec, dict[str, Any]]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(model_names())}")
    spec = MODELS[name]
    unknown = sorted(set(overrides) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"model {name!r} has no setting {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(spec.defaults))}"
        )
    resolved = {**spec.defaults, **overrides}
    return spec, {k: _VALIDATORS[k](k, v) for k, v in sorted(resolved.items())}


def _make_module(family: str, num_classes: int, s: Mapping[str, Any]) -> nn.Module:
    if family == "mlp":
        return MLP(hidden=tuple(s["hidden"]), num_classes=num_classes)
    if family == "mlp_small":
        return MLP(hidden=(s["width"],) * s["depth"], num_classes=num_classes)
    if family == "resnet":
        return ResNet(blocks=s["blocks"], widths=tuple(s["widths"]), num_classes=num_classes)
    if family == "vit":
        return ViT(
            patch=s["patch"],
            hidden=s["embed_dim"],
            depth=s["depth"],
            heads=s["heads"],
            mlp_dim=s["mlp_dim"],
            num_classes=num_classes,
        )
    return LeNet(
        features=tuple(s["features"]),
        kernel_size=s["kernel_size"],
        stride=s["stride"],
        hidden=tuple(s["hidden"]),
        num_classes=num_classes,
        pool=s["pool"],
    )


def _dense_chain(widths: Sequence[int]) -> int:
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def _formula_num_params(
    family: str, input_shape: tuple[int, int, int], num_classes: int, s: Mapping[str, Any]
) -> int:
    """Parameter count from the architecture alone (no tracing); checked against init in tests."""
    if family == "mlp":
        return _dense_chain([math.prod(input_shape), *s["hidden"], num_classes])
    if family == "mlp_small":
        return _dense_chain([math.prod(input_shape), *[s["width"]] * s["depth"], num_classes])
    if family == "resnet":
        return _resnet_num_params(input_shape[2], s["blocks"], s["widths"], num_classes)
    if family == "vit":
        return _vit_num_params(input_shape, num_classes, s)
    h, w = lenet_spatial_sizes(
        input_shape[:2], s["features"], s["kernel_size"], s["stride"], s["pool"]
    )[-1]
    k2 = s["kernel_size"] ** 2
    channels = [input_shape[2], *s["features"]]
    conv = sum(k2 * a * b + b for a, b in zip(channels[:-1], channels[1:], strict=True))
    return conv + _dense_chain([h * w * channels[-1], *s["hidden"], num_classes])


def _resnet_num_params(channels: int, blocks: int, widths: Sequence[int], num_classes: int) -> int:
    """Bias-free 3x3 convolutions, a BatchNorm (scale, bias) after each, the Dense head."""
    total = 9 * channels * widths[0] + 2 * widths[0]  # stem conv + BN
    c_in = widths[0]
    for width in widths:
        for _ in range(blocks):
            total += 9 * c_in * width + 9 * width * width + 4 * width
            c_in = width
    return total + (c_in + 1) * num_classes


def _vit_num_params(
    input_shape: tuple[int, int, int], num_classes: int, s: Mapping[str, Any]
) -> int:
    """Patch embedding, class token, positions, blocks (attention, MLP, 2 LN), LN, head."""
    h, w, c = input_shape
    p, e, m = s["patch"], s["embed_dim"], s["mlp_dim"]
    if h % p or w % p:
        raise UserError(f"vit patch {p} must divide the input's height and width, got {h}x{w}")
    if e % s["heads"]:
        raise UserError(f"vit heads ({s['heads']}) must divide embed_dim ({e})")
    tokens = (h // p) * (w // p) + 1
    block = 4 * (e * e + e) + (e * m + m) + (m * e + e) + 4 * e
    return (p * p * c * e + e) + e + tokens * e + s["depth"] * block + 2 * e + (e + 1) * num_classes


def _head_path(family: str, s: Mapping[str, Any]) -> str:
    """The classifier layer's leaf-path prefix."""
    if family in ("resnet", "vit"):
        return "params/head"
    if family == "mlp_small":
        return f"params/Dense_{s['depth']}"
    return f"params/Dense_{len(s['hidden'])}"


# ----------------------------------------------------------------------------- public API


def classifier_path(name: str, overrides: Mapping[str, Any] | None = None) -> str:
    """The leaf-path prefix of a registered model's classifier layer (no model is built).

    Example:
      >>> classifier_path("lenet")
      'params/Dense_2'
    """
    spec, settings = _resolve(name, dict(overrides or {}))
    return _head_path(spec.family, settings)


def state_collections(name: str) -> tuple[str, ...]:
    """The mutable collections (model state) a registered model keeps, e.g. ``("batch_stats",)``.

    Raises:
      ValueError: unknown model name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(model_names())}")
    return _STATEFUL.get(MODELS[name].family, ())


def count_params(params: PyTree) -> int:
    """Total number of elements over the leaves of a pytree.

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).

    Returns:
      The sum of the leaves' sizes.

    Example:
      >>> count_params({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
      10
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **overrides: Any
) -> ModelDef:
    """Build a registered model as pure ``init / apply`` functions.

    Args:
      name: one of :func:`model_names`.
      input_shape: ``(H, W, C)`` of one example.
      num_classes: number of logits, >= 1.
      **overrides: settings of the model (see the module docstring); lists are accepted where
        tuples are meant, so a config read back from JSON works.

    Returns:
      A :class:`ModelDef`.

    Raises:
      ValueError: unknown name or setting, a value out of range, or a LeNet configuration whose
        spatial size collapses to 0 (naming the layer and the input size).

    Example:
      >>> build_model("lenet", (28, 28, 1), 10).num_params
      44426
    """
    spec, settings = _resolve(name, overrides)
    shape = _check_input_shape(input_shape)
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    num_classes = int(num_classes)
    # Validate spatial sizes here, before any tracing (raises a ValueError naming the layer).
    _formula_num_params(spec.family, shape, num_classes, settings)
    module = _make_module(spec.family, num_classes, settings)
    state = _STATEFUL.get(spec.family, ())
    mode = {"train": False} if state else {}

    def init(key: jax.Array) -> PyTree:
        return module.init(key, jnp.zeros((1, *shape), jnp.float32), **mode)

    def apply(params: PyTree, x: jax.Array, *, train: bool = False) -> Any:
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"model {name!r} expects input of shape (N, {', '.join(map(str, shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not train:
            return module.apply(params, x, **mode)
        if not state:
            return module.apply(params, x), {}
        return module.apply(params, x, train=True, mutable=list(state))

    shapes = jax.eval_shape(init, jax.random.key(0))
    num_params = count_params(shapes["params"] if state else shapes)
    config = {"name": name, "input_shape": list(shape), "num_classes": num_classes, **settings}
    head = _head_path(spec.family, settings)
    return ModelDef(name, module, init, apply, num_params, config, head, state)


def from_config(config: Mapping[str, Any]) -> ModelDef:
    """Rebuild a model from its :attr:`ModelDef.config` (e.g. read back from JSON).

    Raises:
      ValueError: if ``name``, ``input_shape`` or ``num_classes`` is missing, or as
        :func:`build_model`.
    """
    missing = [k for k in ("name", "input_shape", "num_classes") if k not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}; got keys {sorted(config)}")
    return build_model(**dict(config))


def small_model_grid(
    kind: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    targets: Sequence[int] = DEFAULT_GRID_TARGETS,
) -> list[tuple[dict[str, Any], int]]:
    """Small direct models whose sizes are nearest to each target parameter count.

    For ``kind="mlp"`` the models are ``mlp_small`` with one hidden layer of width ``h``
    (``(H*W*C + num_classes + 1) * h + num_classes`` parameters); for ``kind="lenet"`` they are
    ``lenet_small`` with LeNet-5 scaled uniformly by ``s``: channels ``round(6s), round(16s)``,
    hidden ``round(120s), round(84s)`` (each >= 1), kernel 5, stride 1, pool 2.

    Args:
      kind: ``"mlp"`` or ``"lenet"`` (built as ``GRID_MODELS[kind]``).
      input_shape: ``(H, W, C)``.
      num_classes: number of logits.
      targets: parameter budgets; by default about 1k to 60k.

    Returns:
      ``(overrides, num_params)`` pairs, strictly increasing in ``num_params`` (targets that
      pick the same model appear once), with
      ``build_model(GRID_MODELS[kind], input_shape, num_classes, **overrides).num_params ==
      num_params``.

    Raises:
      ValueError: unknown kind, empty targets or a target < 1.

    Example:
      >>> [n for _, n in small_model_grid("mlp", (28, 28, 1), 10)]
      [805, 2395, 3985, 7960, 15115, 30220, 59635]
    """
    if kind not in GRID_MODELS:
        raise ValueError(f"unknown grid kind {kind!r}; allowed: {', '.join(sorted(GRID_MODELS))}")
    if len(targets) == 0 or not all(_is_int(t) and t >= 1 for t in targets):
        raise ValueError(f"targets must be a non-empty list of integers >= 1, got {targets!r}")
    shape = _check_input_shape(input_shape)
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    name = GRID_MODELS[kind]
    family = MODELS[name].family

    candidates: list[dict[str, Any]] = []
    if kind == "mlp":
        per_unit = math.prod(shape) + num_classes + 1
        widths = set()
        for t in targets:
            x = (t - num_classes) / per_unit
            widths.update({max(1, math.floor(x)), max(1, math.ceil(x))})
        candidates = [{"width": h, "depth": 1} for h in sorted(widths)]
    else:

        def scaled(base: int, s: float) -> int:
            return max(1, math.floor(base * s + 0.5))

        seen = set()
        for i in range(1, 1001):
            s = i / 100.0
            cfg = (scaled(6, s), scaled(16, s), scaled(120, s), scaled(84, s))
            if cfg not in seen:
                seen.add(cfg)
                candidates.append(
                    {
                        "features": [cfg[0], cfg[1]],
                        "kernel_size": 5,
                        "stride": 1,
                        "hidden": [cfg[2], cfg[3]],
                        "pool": 2,
                    }
                )
    sized = [(c, _formula_num_params(family, shape, num_classes, c)) for c in candidates]
    picked: dict[int, dict[str, Any]] = {}
    for t in targets:
        overrides, n = min(sized, key=lambda cn: (abs(cn[1] - t), cn[1]))
        picked[n] = overrides
    return [(dict(picked[n]), n) for n in sorted(picked)]
