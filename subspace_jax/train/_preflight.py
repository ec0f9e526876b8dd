"""Check a configuration before anything trains, every problem as a :class:`UserError`."""

from __future__ import annotations

import jax

from subspace_jax._errors import as_user_error
from subspace_jax.data import Dataset
from subspace_jax.models import build_model
from subspace_jax.train._loop import (
    TrainConfig,
    check_data_fits,
    config_layout,
    input_shape,
    validate_config,
)


def check_config(config: TrainConfig, data: Dataset | None = None) -> None:
    """Reject a config that cannot train, before any data is read (or, given ``data``, before
    anything compiles).

    Runs :func:`validate_config`, lays the subspace out over the model's parameter shapes
    (nothing is drawn or compiled: a ``d`` out of range, a per-leaf ``d`` below the number of
    leaves, an input too small for the model) and, given ``data``, :func:`check_data_fits`.
    Those checks raise ``ValueError`` for bad input only; here each is a
    :class:`~subspace_jax.UserError`.

    Raises:
      UserError: naming the bad value and what is allowed.
    """
    with as_user_error():
        validate_config(config)
        shape = input_shape(config.model, config.dataset, config.image_size)
        model = build_model(config.model, shape, 10, **dict(config.model_overrides))
        config_layout(config, jax.eval_shape(model.init, jax.random.key(0)))
        if data is not None:
            check_data_fits(config, data)
