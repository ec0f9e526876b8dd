"""Dataset loaders (plain numpy; no jax): IDX, CIFAR-10 batches, tfds and embedded digits.

``load_dataset(name, data_dir)`` is the entry point; the per-source readers return raw uint8
arrays (:class:`RawData`); ``iterate_batches`` yields host-side minibatches.
"""

from subspace_jax.data._cifar import load_cifar10
from subspace_jax.data._dataset import DATASETS, load_dataset
from subspace_jax.data._embedded import load_embedded_digits
from subspace_jax.data._idx import load_idx, load_mnist
from subspace_jax.data._splits import (
    channel_stats,
    iterate_batches,
    num_batches,
    resize,
    shuffle_order,
    split_validation,
    standardize,
)
from subspace_jax.data._tfds import load_tfds
from subspace_jax.data._types import DataError, Dataset, RawData, data_fingerprint

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "RawData",
    "channel_stats",
    "data_fingerprint",
    "iterate_batches",
    "load_cifar10",
    "load_dataset",
    "load_embedded_digits",
    "load_idx",
    "load_mnist",
    "load_tfds",
    "num_batches",
    "resize",
    "shuffle_order",
    "split_validation",
    "standardize",
]
