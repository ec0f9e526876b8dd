"""Training: the jittable step, the seed-vmapped loop, and measurements."""

from subspace_jax.train._loop import (
    DIRECT_LR,
    OPTIMIZERS,
    SUBSPACE_BASE_LR,
    TrainConfig,
    Trained,
    default_image_size,
    load_data,
    make_optimizer,
    resolve_lr,
    train_and_evaluate,
    validate_config,
)
from subspace_jax.train._metrics import current_rss_bytes, median_ms, peak_memory_bytes, time_call
from subspace_jax.train._step import (
    compile_steps,
    cross_entropy,
    make_eval_step,
    make_loss_fn,
    make_train_step,
)

__all__ = [
    "DIRECT_LR",
    "OPTIMIZERS",
    "SUBSPACE_BASE_LR",
    "TrainConfig",
    "Trained",
    "compile_steps",
    "cross_entropy",
    "current_rss_bytes",
    "default_image_size",
    "load_data",
    "make_eval_step",
    "make_loss_fn",
    "make_optimizer",
    "make_train_step",
    "median_ms",
    "peak_memory_bytes",
    "resolve_lr",
    "time_call",
    "train_and_evaluate",
    "validate_config",
]
