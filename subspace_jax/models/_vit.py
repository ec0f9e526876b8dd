"""A small Vision Transformer for 32x32 inputs (Dosovitskiy et al. 2021, pre-LayerNorm)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class EncoderBlock(nn.Module):
    """``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP of width ``mlp_dim``."""

    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
        y = nn.LayerNorm()(x)
        y = nn.Dense(self.mlp_dim)(y)
        y = nn.Dense(x.shape[-1])(nn.gelu(y))
        return x + y


class ViT(nn.Module):
    """Patch embedding, a class token, learned position embeddings, ``depth`` encoder blocks.

    The image is cut into ``patch x patch`` patches (a strided convolution to ``hidden``
    channels: 64 patches of 4x4 on 32x32), a class token is prepended, learned position
    embeddings are added, then ``depth`` pre-LayerNorm blocks, a final LayerNorm, and the
    class token's features go to a ``Dense`` classifier named ``head``. No dropout and no
    mutable state. With the registry's defaults (patch 4, hidden 128, depth 6, 4 heads,
    MLP 256) it has 811,146 parameters on CIFAR-10.

    Attributes:
      patch: patch side; it must divide the image's height and width.
      hidden: width of the token features.
      depth: number of encoder blocks.
      heads: attention heads (must divide ``hidden``).
      mlp_dim: hidden width of each block's MLP.
      num_classes: number of logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ViT(patch=4, hidden=16, depth=1, heads=2, mlp_dim=32)
      >>> v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(v, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    patch: int = 4
    hidden: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits of a batch ``x`` of shape ``(N, H, W, C)``: shape ``(N, num_classes)``."""
        if x.ndim != 4:
            raise ValueError(f"ViT expects NHWC input of rank 4, got shape {tuple(x.shape)}")
        p = self.patch
        x = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", name="embed")(x)
        n = x.shape[0]
        x = x.reshape((n, -1, self.hidden))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.hidden)).astype(x.dtype), x], 1)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], self.hidden)
        )
        x = x + pos
        for _ in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])
