"""LeNet-5 style convolutional classifier with configurable size."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


def lenet_spatial_sizes(
    input_hw: Sequence[int],
    features: Sequence[int],
    kernel_size: int,
    stride: int,
    pool: int,
) -> list[tuple[int, int]]:
    """Spatial size after each ``conv -> pool`` stage of :class:`LeNet`.

    Convolutions are VALID with stride ``stride``: ``out = (n - kernel_size) // stride + 1``;
    pooling is VALID max pooling with window and stride ``pool``: ``out = n // pool`` (``pool=1``
    means no pooling).

    Args:
      input_hw: ``(H, W)`` of the input.
      features: output channels of each convolution (only its length matters).
      kernel_size: square kernel side.
      stride: convolution stride.
      pool: max-pool window and stride.

    Returns:
      One ``(h, w)`` per stage, the size after that stage's pooling.

    Raises:
      ValueError: if a convolution or pooling would see an input smaller than its window, naming
        the layer and the input size.

    Example:
      >>> lenet_spatial_sizes((32, 32), (6, 16), 5, 1, 2)
      [(14, 14), (5, 5)]
    """
    h, w = (int(n) for n in input_hw)
    input_desc = f"{h}x{w}"
    sizes = []
    for i in range(len(features)):
        if h < kernel_size or w < kernel_size:
            raise ValueError(
                f"LeNet Conv_{i} (kernel_size={kernel_size}) needs a spatial size >= "
                f"{kernel_size}x{kernel_size}, but its input is {h}x{w} (model input "
                f"{input_desc}); use a smaller kernel_size, stride, pool or fewer conv layers"
            )
        h = (h - kernel_size) // stride + 1
        w = (w - kernel_size) // stride + 1
        if h < pool or w < pool:
            raise ValueError(
                f"LeNet max-pool after Conv_{i} (pool={pool}) needs a spatial size >= "
                f"{pool}x{pool}, but its input is {h}x{w} (model input {input_desc}); use a "
                "smaller kernel_size, stride, pool or fewer conv layers"
            )
        h, w = h // pool, w // pool
        sizes.append((h, w))
    return sizes


class LeNet(nn.Module):
    """``(Conv VALID -> ReLU -> max-pool)`` per feature count, then an MLP head.

    The defaults are LeNet-5: conv6 5x5 -> pool 2 -> conv16 5x5 -> pool 2 -> 120 -> 84 -> 10,
    with 61,706 parameters on 32x32x1, 62,006 on 32x32x3 and 44,426 on 28x28x1.

    Attributes:
      features: output channels of each convolution.
      kernel_size: square kernel side of every convolution.
      stride: stride of every convolution.
      hidden: widths of the dense layers between the flattened features and the logits (each
        followed by ReLU).
      num_classes: number of logits.
      pool: max-pool window and stride after each convolution (1: no pooling).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = LeNet()
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
      >>> model.apply(variables, jnp.zeros((2, 32, 32, 1))).shape
      (2, 10)
    """

    features: tuple[int, ...] = (6, 16)
    kernel_size: int = 5
    stride: int = 1
    hidden: tuple[int, ...] = (120, 84)
    num_classes: int = 10
    pool: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of a batch.

        Args:
          x: images, shape ``(N, H, W, C)``.

        Returns:
          Logits, shape ``(N, num_classes)``.

        Raises:
          ValueError: if ``x`` is not 4-D, or its spatial size collapses below a window.
        """
        if x.ndim != 4:
            raise ValueError(f"LeNet expects NHWC input of rank 4, got shape {tuple(x.shape)}")
        # Raises a ValueError naming the layer before XLA sees an empty convolution.
        lenet_spatial_sizes(x.shape[1:3], self.features, self.kernel_size, self.stride, self.pool)
        k, s, p = self.kernel_size, self.stride, self.pool
        for c in self.features:
            x = nn.Conv(c, kernel_size=(k, k), strides=(s, s), padding="VALID")(x)
            x = nn.relu(x)
            if p > 1:
                x = nn.max_pool(x, window_shape=(p, p), strides=(p, p), padding="VALID")
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)
