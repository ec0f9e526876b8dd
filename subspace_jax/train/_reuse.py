"""Which :class:`~subspace_jax.train.TrainConfig` fields enter the sweep's reuse key.

``sweep`` and ``id`` reuse a finished run from ``runs.jsonl`` when its ``config_key``
(:func:`~subspace_jax.intrinsic_dim.config_key`) matches: a hash of every field that changes
a run's results. Every field of ``TrainConfig`` is classified here, in one of two places, and
a test fails while a new field is in neither: a field that changes results goes in
``KEY_FIELDS``; one that does not (where the data is read from, the d and seed stored beside
the key) goes in ``NOT_IN_KEY`` with the reason. Flags that are not config fields (``--out``,
``--json``, ``--wait``, ``--quiet``) never enter the key.

A field added to ``KEY_FIELDS`` keeps old keys (and so old ``runs.jsonl`` files) valid only if
``TrainConfig.to_dict`` leaves it out at its default, as it does for the later fields.
"""

from __future__ import annotations

#: Fields that change a run's results: all of them enter the key (those added after the first
#: release only when not at their default, see ``TrainConfig.to_dict``).
KEY_FIELDS = (
    "model",
    "dataset",
    "projection",
    "per_layer",
    "optimizer",
    "lr",  # when None, the default rule's version (LR_RULE) enters instead
    "epochs",
    "batch_size",
    "l2",
    "val_size",
    "image_size",
    "max_steps",
    "data_seed",
    "model_overrides",
    "burn_in_steps",
    "said",
    "lottery_every",
    "theta0_path",  # with a hash of the file's bytes
    "on_divergence",
    "max_retries",
    "augment",
    "classes",
    "reinit_head",
)

#: Fields left out of the key, with the reason.
NOT_IN_KEY = {
    "dim": "stored beside the key in each record: one key covers every d",
    "seeds": "stored beside the key: one record a seed, reused seed by seed",
    "data_dir": "where the data is read from: the data itself enters as its fingerprint",
}
