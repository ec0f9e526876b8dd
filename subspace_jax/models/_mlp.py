"""A fully connected classifier on flattened NHWC images."""

from __future__ import annotations

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Flatten, then ``Dense + ReLU`` per hidden width, then a ``Dense`` to the logits.

    The parameter count is ``sum((n_in + 1) * n_out)`` over consecutive widths
    ``(H * W * C, *hidden, num_classes)``: 784-200-10 has 159,010 parameters, 784-200-200-10
    has 199,210, 2352-200-10 (28x28x3) has 472,610.

    Attributes:
      hidden: width of each hidden layer, in order (may be empty: a linear classifier).
      num_classes: number of logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MLP(hidden=(200,))
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> model.apply(variables, jnp.zeros((5, 28, 28, 1))).shape
      (5, 10)
    """

    hidden: tuple[int, ...]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of a batch.

        Args:
          x: images, shape ``(N, H, W, C)`` (any trailing shape is flattened).

        Returns:
          Logits, shape ``(N, num_classes)``.
        """
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)
