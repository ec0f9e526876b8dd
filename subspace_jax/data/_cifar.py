"""Reader for CIFAR-10 in its binary and python-pickle layouts (plain numpy).

Binary layout (``cifar-10-batches-bin``): ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
``test_batch.bin``; each record is 1 label byte then 3072 pixel bytes: the 32x32 red plane,
then green, then blue (row-major).

Pickle layout (``cifar-10-batches-py``): ``data_batch_1`` .. ``data_batch_5`` and
``test_batch``; each a pickled dict with ``b'data'`` (``uint8[N, 3072]``, same plane order) and
``b'labels'`` (N ints). Pickles are read with a restricted unpickler that only rebuilds numpy
arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from pathlib import Path

import numpy as np

from subspace_jax.data._types import DataError, RawData

_SIDE = 32
_PIXELS = 3 * _SIDE * _SIDE  # 3072
_RECORD = 1 + _PIXELS  # 3073
_BATCH = 10_000  # images in each batch of the real dataset
_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_TEST = "test_batch"
_BIN_DIR = "cifar-10-batches-bin"
_PY_DIR = "cifar-10-batches-py"

# (module, name) pairs a CIFAR pickle may reference: numpy array reconstruction only.
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals an array pickle needs."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        # numpy 2 renamed numpy.core to numpy._core; accept pickles written by either.
        tail = module.split(".", 2)[-1]
        candidates = [module]
        if module.startswith(("numpy.core.", "numpy._core.")):
            candidates = [f"numpy._core.{tail}", f"numpy.core.{tail}"]
        for candidate in candidates:
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def _images_from_planes(flat: np.ndarray) -> np.ndarray:
    """``uint8[N, 3072]`` in R, G, B plane order -> ``uint8[N, 32, 32, 3]`` (NHWC)."""
    return np.ascontiguousarray(flat.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))


def _check_labels(path: Path, labels: np.ndarray) -> None:
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{path}: label {int(labels.max())} out of range, expected 0..9")


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) == 0 or len(raw) % _RECORD:
        raise DataError(
            f"{path}: {len(raw)} bytes, expected a positive multiple of {_RECORD} "
            f"(1 label byte + {_PIXELS} pixel bytes per image)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0].copy()
    _check_labels(path, labels)
    return _images_from_planes(records[:, 1:]), labels


def _read_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot unpickle a CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: unpickled a {type(batch).__name__}, expected a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: expected keys b'data' and b'labels', found {list(batch)}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(
            f"{path}: b'data' is {data.dtype}{list(data.shape)}, expected uint8[N, {_PIXELS}]"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(
            f"{path}: {len(data)} images but b'labels' has shape {labels.shape}, expected "
            f"({len(data)},)"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return _images_from_planes(data), labels.astype(np.uint8)


def _check_batch_sizes(folder: Path, names: list[str], counts: list[int]) -> None:
    """Every batch holds the same number of images (10,000 in the real dataset).

    A file cut at a record boundary is still a whole number of records; it shows up as a
    batch with fewer images than the others.
    """
    full = max(counts)
    for name, n in zip(names, counts, strict=True):
        if n < full:
            raise DataError(
                f"{folder / name}: {n} images, but the other batches hold {full} (every "
                f"CIFAR-10 batch holds {_BATCH} images): truncated file?"
            )


def _locate(data_dir: Path) -> tuple[Path, str]:
    """The batches folder and its layout (``"bin"`` or ``"py"``)."""
    for folder in (data_dir, data_dir / _BIN_DIR, data_dir / _PY_DIR):
        if (folder / "data_batch_1.bin").is_file():
            return folder, "bin"
        if (folder / "data_batch_1").is_file():
            return folder, "py"
    raise DataError(
        f"{data_dir}: no CIFAR-10 batches found; expected data_batch_1..5.bin and "
        f"test_batch.bin (binary layout) or data_batch_1..5 and test_batch (pickle layout), "
        f"in this folder or in {_BIN_DIR}/ or {_PY_DIR}/ inside it"
    )


def load_cifar10(data_dir: str | os.PathLike) -> RawData:
    """Read CIFAR-10 from its binary or python-pickle batches.

    Args:
      data_dir: the batches folder itself (``.../cifar-10-batches-bin`` or
        ``.../cifar-10-batches-py``) or the folder that holds it. The binary layout is
        preferred when both are present.

    Returns:
      :class:`RawData` with ``x_train uint8[N, 32, 32, 3]`` (NHWC, N = 50000 for the real
      dataset, batches 1..5 in order), ``y_train uint8[N]``, ``x_test uint8[M, 32, 32, 3]``
      (M = 10000) and ``y_test uint8[M]``.

    Raises:
      DataError: the folder or a batch is missing, a binary batch is not a multiple of 3073
        bytes, a batch holds fewer images than the others (a file cut at a record
        boundary), a pickle is not a CIFAR batch, or a label is outside 0..9.

    Example:
      >>> raw = load_cifar10("../shared/data/cifar10")  # doctest: +SKIP
      >>> raw.x_train.shape  # doctest: +SKIP
      (50000, 32, 32, 3)
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: not a folder; expected {_BIN_DIR}/ or {_PY_DIR}/ or their contents"
        )
    folder, layout = _locate(data_dir)
    suffix, read = (".bin", _read_bin) if layout == "bin" else ("", _read_pickle)
    names = [n + suffix for n in [*_TRAIN, _TEST]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected {', '.join(names)}")
    batches = [read(folder / n) for n in names]
    _check_batch_sizes(folder, names, [len(y) for _, y in batches])
    train, (x_test, y_test) = batches[:-1], batches[-1]
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return RawData(x_train, y_train, x_test, y_test, source=str(folder))
