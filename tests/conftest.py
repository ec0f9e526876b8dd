"""Suite-wide settings: JAX's strict dtype promotion for every test.

Under ``jax.numpy_dtype_promotion("strict")`` an operation mixing dtypes (float32 with float64,
an int array with a float array, a weakly typed Python scalar aside) raises instead of silently
promoting, so library code must cast explicitly. The fixture is session-scoped so that module-
and class-scoped fixtures (which build projection states) run under it too. Subprocesses (the
CLI tests) run with JAX's default promotion, as users do.
"""

import jax
import pytest


@pytest.fixture(autouse=True, scope="session")
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def standard_dtype_promotion():
    """JAX's default promotion for a test that runs a user's own training code.

    optax's Adam computes ``decay ** count`` (float ** int32), which strict mode rejects; the
    library calls it under standard promotion itself (``train/_step.py``), user code does not.
    """
    with jax.numpy_dtype_promotion("standard"):
        yield
