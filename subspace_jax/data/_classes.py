"""Keep a subset of a dataset's classes, relabelled ``0..k-1`` (plain numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from subspace_jax._errors import UserError
from subspace_jax.data._types import Dataset


def select_classes(data: Dataset, classes: Sequence[int]) -> Dataset:
    """The examples of ``classes`` only, in every split, with labels ``classes[i] -> i``.

    The images are those of ``data`` as preprocessed (standardised with the statistics of the
    full training split), and the validation examples are those of the chosen classes among
    the validation split carved from the full training set, so the split is the same whatever
    the subset (CIFAR-10 classes 0-4 and 5-9 get disjoint halves of one split).

    Args:
      data: a loaded :class:`Dataset`.
      classes: distinct labels of ``data``, at least 2; their order gives the new labels.

    Returns:
      A :class:`Dataset` with ``num_classes = len(classes)`` and ``fingerprint`` None (the
      fingerprint of the new arrays is computed on demand).

    Raises:
      ValueError: fewer than 2 classes, a repeated class, or a class outside
        ``0..num_classes-1``.

    Example:
      >>> five = select_classes(data, [5, 6, 7, 8, 9])  # old label 5 is now 0, ... 9 is 4
    """
    classes = [int(c) for c in classes]
    if len(classes) < 2:
        raise UserError(f"classes needs at least 2 labels to classify, got {classes}")
    if len(set(classes)) != len(classes):
        raise UserError(f"classes must be distinct, got {classes}")
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise UserError(
            f"classes {bad} are not labels of {data.name} "
            f"(its labels are 0..{data.num_classes - 1})"
        )
    lookup = np.full(data.num_classes, -1, np.int64)
    lookup[classes] = np.arange(len(classes))

    def keep(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = lookup[y] >= 0
        return x[mask], lookup[y[mask]].astype(y.dtype)

    x_train, y_train = keep(data.x_train, data.y_train)
    x_val, y_val = keep(data.x_val, data.y_val)
    x_test, y_test = keep(data.x_test, data.y_test)
    return data._replace(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(classes),
        fingerprint=None,
    )
