"""CIFAR-style ResNets (He et al. 2016, section 4.2) with BatchNorm and option-A shortcuts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

#: BatchNorm settings of the usual CIFAR ResNet code (PyTorch's momentum 0.1, eps 1e-5).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _shortcut_a(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    if extra > 0:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nn.Module):
    """``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, plus the shortcut, then ReLU."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda s: nn.Conv(  # noqa: E731
            self.features,
            (3, 3),
            strides=(s, s),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=nn.initializers.he_normal(),
        )
        norm = lambda: nn.BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON
        )
        y = nn.relu(norm()(conv(self.stride)(x)))
        y = norm()(conv(1)(y))
        return nn.relu(y + _shortcut_a(x, self.features, self.stride))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): 6n + 2 layers, stages of 16, 32, 64 channels.

    ``conv3x3(16) -> BN -> ReLU``, then three stages of ``blocks`` basic blocks (the first
    block of stages 2 and 3 halves the spatial size), global average pooling and a ``Dense``
    classifier named ``head``. Shortcuts are option A of the paper (identity; where the shape
    changes, subsampled and zero-padded: no parameters), so ResNet-20 (``blocks=3``) has
    269,722 parameters (the paper's 0.27M) and ResNet-32 (``blocks=5``) 464,154 on CIFAR-10.
    BatchNorm keeps running statistics in the ``batch_stats`` collection (momentum 0.9,
    epsilon 1e-5): ``train=True`` normalises with the batch's statistics and updates them
    (apply with ``mutable=["batch_stats"]``), ``train=False`` uses them.

    Attributes:
      blocks: basic blocks per stage (n): 3 for ResNet-20, 5 for ResNet-32.
      widths: channels of the three stages.
      num_classes: number of logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet(blocks=3)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
      >>> sorted(variables)
      ['batch_stats', 'params']
      >>> logits, updates = model.apply(
      ...     variables, jnp.zeros((2, 32, 32, 3)), train=True, mutable=["batch_stats"])
      >>> logits.shape
      (2, 10)
    """

    blocks: int = 3
    widths: tuple[int, ...] = (16, 32, 64)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits of a batch ``x`` of shape ``(N, H, W, C)``: shape ``(N, num_classes)``."""
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC input of rank 4, got shape {tuple(x.shape)}")
        x = nn.Conv(
            self.widths[0],
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=nn.initializers.he_normal(),
        )(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)(x)
        x = nn.relu(x)
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, stride)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)
