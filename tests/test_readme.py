"""The README's Python example runs as written and trains."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    # A user's own code runs under JAX's default promotion (the suite's strict mode is for the
    # library): the example calls optax's Adam, which computes decay ** count (float ** int32).
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "D = 1994, d = 100" in out
    assert float(namespace["loss"]) < 0.3
    losses = np.asarray(namespace["losses"])
    assert losses.shape == (5,) and np.all(losses < 0.3)
