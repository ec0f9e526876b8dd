"""Checks and settings shared by test files (imported by them; collects no tests)."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

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


def load_script(relpath: str):
    """A script of the repository (``experiments/summarize.py``, ``benchmarks/conv_loop.py``)
    loaded as a module; its folder goes on ``sys.path``, as for a script importing a sibling
    (``experiments/summarize.py`` imports ``experiments/run.py`` as ``run``)."""
    path = ROOT / relpath
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name = "script_" + "_".join(path.with_suffix("").parts[-2:])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module
