"""Checks and settings shared by test files (imported by them; collects no tests)."""

import jax
import jax.numpy as jnp
import numpy as np

#: A ResNet-20 with BatchNorm narrowed to one block of 2, 4 and 4 channels a stage: fast.
TINY_RESNET = {"blocks": 1, "widths": [2, 4, 4]}


def check_grad_is_transpose_and_jit_matches_eager(proj, state, w, g):
    """Under strict dtype and rank promotion: grad of <P w, g> is P^T g; jit equals eager."""
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        grad = jax.grad(lambda w: jnp.vdot(proj.apply(state, w), g))(w)
        pt = proj.transpose(state, g)
        np.testing.assert_allclose(grad, pt, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            jax.jit(proj.apply)(state, w), proj.apply(state, w), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(jax.jit(proj.transpose)(state, g), pt, rtol=1e-6, atol=1e-6)
