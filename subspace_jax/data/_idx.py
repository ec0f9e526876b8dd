"""Readers for the IDX format of MNIST and Fashion-MNIST (plain numpy).

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the payload in C order. Files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from subspace_jax.data._types import DataError, RawData

# IDX type codes (the third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in ``.gz``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``*-idx3-ubyte``, ``*-idx1-ubyte``, optionally ``.gz``).

    Args:
      path: the file.

    Returns:
      The array with the file's shape, e.g. ``uint8[60000, 28, 28]`` for MNIST training images
      or ``uint8[60000]`` for its labels, in native byte order.

    Raises:
      DataError: the file is missing, unreadable, has a bad magic number or type code, or its
        payload is not exactly ``prod(dims) * itemsize`` bytes.

    Example:
      >>> x = load_idx("data/mnist/t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
      >>> x.shape, x.dtype  # doctest: +SKIP
      ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(
            f"{path}: {len(raw)} bytes, expected an IDX file (at least a 4-byte magic number)"
        )
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}, expected 0x0000<type><ndim>"
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X}, expected one of {known}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions, expected at least 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated header, {len(raw)} bytes but {ndim} dimensions need {header}"
        )
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        raise DataError(
            f"{path}: payload is {got} bytes, expected {expected} for shape {dims} of "
            f"{dtype.name}" + (" (truncated file?)" if got < expected else " (trailing bytes)")
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = data_dir / name
        if p.is_file():
            return p
    return None


def load_mnist(data_dir: str | os.PathLike) -> RawData:
    """Read MNIST (or Fashion-MNIST, same file names) from a folder of IDX files.

    The folder must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped
    (``.gz``); an uncompressed file is preferred when both exist.

    Args:
      data_dir: the folder.

    Returns:
      :class:`RawData` with ``x_train uint8[N, 28, 28]``, ``y_train uint8[N]`` (N = 60000 for
      the real datasets), ``x_test uint8[M, 28, 28]``, ``y_test uint8[M]`` (M = 10000).

    Raises:
      DataError: the folder or a file is missing or corrupt, or images and labels disagree.

    Example:
      >>> raw = load_mnist("../shared/data/mnist")  # doctest: +SKIP
      >>> raw.x_train.shape, raw.y_test.shape  # doctest: +SKIP
      ((60000, 28, 28), (10000,))
    """
    data_dir = Path(data_dir)
    expected = ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a folder; expected a folder holding {expected}")
    paths = {k: _find(data_dir, s) for k, s in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] + "[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"{data_dir}: missing {', '.join(missing)}; expected the four MNIST IDX files "
            f"{expected}"
        )
    arrays = {k: load_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        px, py = paths[f"x_{split}"], paths[f"y_{split}"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{px}: images of shape {x.shape} {x.dtype}, expected uint8[N, H, W]")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise DataError(f"{py}: labels of shape {y.shape} {y.dtype}, expected uint8[N]")
        if len(x) != len(y):
            raise DataError(f"{px} has {len(x)} images but {py} has {len(y)} labels")
        if len(y) and int(y.max()) > 9:
            raise DataError(f"{py}: label {int(y.max())} out of range, expected 0..9")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{data_dir}: train images {arrays['x_train'].shape[1:]} and test images "
            f"{arrays['x_test'].shape[1:]} differ in size"
        )
    return RawData(**arrays, source=str(data_dir))
