"""Optional loader through TensorFlow Datasets (``pip install subspace-jax[tfds]``)."""

from __future__ import annotations

import importlib
import os

import numpy as np

from subspace_jax.data._types import DataError, RawData

TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10")


def tfds_available() -> bool:
    """Whether ``tensorflow_datasets`` can be imported (imports it on success)."""
    try:
        importlib.import_module("tensorflow_datasets")
    except ImportError:
        return False
    return True


def load_tfds(name: str, data_dir: str | os.PathLike | None = None) -> RawData:
    """Load ``mnist``, ``fashion_mnist`` or ``cifar10`` through TensorFlow Datasets.

    ``tensorflow_datasets`` is imported only here. It downloads the dataset into ``data_dir``
    (tfds' default, ``~/tensorflow_datasets``, when None) on first use.

    Args:
      name: one of ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``.
      data_dir: tfds' cache folder, or None for its default.

    Returns:
      :class:`RawData` with uint8 images (``[N, 28, 28]`` for the MNIST-like datasets,
      ``[N, 32, 32, 3]`` for CIFAR-10) and uint8 labels; ``source == "tfds:<name>"``.

    Raises:
      ValueError: ``name`` is not supported.
      DataError: ``tensorflow_datasets`` is not installed, or tfds fails to load the data.

    Example:
      >>> raw = load_tfds("mnist")  # doctest: +SKIP
    """
    if name not in TFDS_NAMES:
        raise DataError(f"load_tfds: unknown dataset {name!r}, expected one of {TFDS_NAMES}")
    try:
        tfds = importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        raise DataError(
            f"loading {name!r} through TensorFlow Datasets needs tensorflow_datasets, which is "
            "not installed: pip install subspace-jax[tfds] (or pass a folder of the standard "
            "files as data_dir / --data-dir)"
        ) from e
    kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    splits = {}
    for split in ("train", "test"):
        try:
            batch = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, **kwargs))
        except Exception as e:  # tfds raises many types (download, checksum, missing files)
            raise DataError(
                f"tfds could not load {name!r} split {split!r} "
                f"(data_dir={data_dir}): {type(e).__name__}: {e}"
            ) from e
        images = np.asarray(batch["image"])
        labels = np.asarray(batch["label"])
        if images.ndim == 4 and images.shape[-1] == 1:  # MNIST-like: drop the channel axis
            images = images[..., 0]
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"tfds:{name} {split}: labels outside 0..9")
        splits[split] = (images.astype(np.uint8), labels.astype(np.uint8))
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    return RawData(x_train, y_train, x_test, y_test, source=f"tfds:{name}")
