"""Validation splits, preprocessing and host-side batching (plain numpy)."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import numpy as np

from subspace_jax._errors import UserError

_CHUNK = 4096  # images converted at a time, bounding float64 / int64 temporaries


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise UserError(f"{what} must be an integer, got {value!r}") from None


def split_validation(
    x: np.ndarray, y: np.ndarray, val_size: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Carve a validation set out of a training set with a seeded permutation.

    The ``val_size`` indices are the first entries of ``np.random.default_rng(seed)``'s
    permutation of ``range(N)``; both parts keep the original order of the examples.

    Args:
      x: ``[N, ...]`` training inputs.
      y: ``[N]`` training labels.
      val_size: number of validation examples, ``0 <= val_size < N``.
      seed: seed of the permutation; the same seed always gives the same split.

    Returns:
      ``(x_train [N - V, ...], y_train [N - V], x_val [V, ...], y_val [V])``.

    Raises:
      ValueError: lengths differ or ``val_size`` is outside ``[0, N)``.

    Example:
      >>> x, y = np.arange(10)[:, None], np.arange(10)
      >>> xt, yt, xv, yv = split_validation(x, y, 3, seed=0)
      >>> len(yt), len(yv)
      (7, 3)
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"split_validation: {n} inputs but {len(y)} labels")
    val_size = _as_int(val_size, "val_size")
    if not 0 <= val_size < n:
        raise UserError(
            f"val_size={val_size} out of range: need 0 <= val_size < {n} (the training set size)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:val_size]] = True
    return x[~is_val], y[~is_val], x[is_val], y[is_val]


def resize(x: np.ndarray, image_size: int | None) -> np.ndarray:
    """Zero-pad or centre-crop square NHWC images to ``image_size``.

    Args:
      x: ``[N, S, S, C]`` images.
      image_size: None (keep ``S``) or the target side; ``S + 2k`` crops ``k`` pixels from each
        side, ``S - 2k`` pads ``k`` zero pixels on each side. Only even differences are allowed
        so the image stays centred.

    Returns:
      ``[N, image_size, image_size, C]`` images, same dtype.

    Raises:
      ValueError: the images are not square or the size difference is odd.
    """
    if image_size is None:
        return x
    side = x.shape[1]
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"resize: images of shape {x.shape[1:3]} are not square")
    diff = image_size - side
    if diff % 2:
        raise ValueError(f"resize: {side} -> {image_size} is not centred (odd difference)")
    k = abs(diff) // 2
    if diff > 0:
        return np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)))
    if diff < 0:
        return np.ascontiguousarray(x[:, k : side - k, k : side - k, :])
    return x


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 NHWC images scaled to ``[0, 1]``.

    Computed exactly from a per-channel histogram of the 256 pixel values (built chunk by
    chunk, so memory stays small), then a two-pass mean / variance over the histogram.

    Args:
      x: ``uint8[N, H, W, C]`` images, ``N >= 1``.

    Returns:
      ``(mean float64[C], std float64[C])`` of ``x / 255`` over all images and pixels
      (population std, ``ddof=0``).

    Raises:
      ValueError: ``x`` is not a non-empty uint8 NHWC array.
    """
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) == 0:
        raise ValueError(
            f"channel_stats: expected non-empty uint8[N, H, W, C], got {x.dtype}{list(x.shape)}"
        )
    c = x.shape[-1]
    offsets = 256 * np.arange(c, dtype=np.intp)
    counts = np.zeros(256 * c, dtype=np.int64)
    for i in range(0, len(x), _CHUNK // 2):
        values = x[i : i + _CHUNK // 2].reshape(-1, c) + offsets  # channel k -> 256k + value
        counts += np.bincount(values.ravel(), minlength=256 * c)
    counts = counts.reshape(c, 256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum(axis=1)
    mean = counts @ levels / n
    var = (counts * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / n
    return mean, np.sqrt(var)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x / 255 - mean) / std`` per channel, as float32, chunk by chunk.

    Args:
      x: ``uint8[N, H, W, C]`` images.
      mean: ``[C]`` in ``[0, 1]`` units.
      std: ``[C]`` in ``[0, 1]`` units, positive.

    Returns:
      ``float32[N, H, W, C]``.
    """
    # In raw pixel units: (x - 255 mean) / (255 std); with mean 0, std 1 this is exactly x / 255.
    shift = (255.0 * np.asarray(mean, np.float64)).astype(np.float32)
    scale = (255.0 * np.asarray(std, np.float64)).astype(np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, len(x), _CHUNK):
        chunk = x[i : i + _CHUNK].astype(np.float32)
        chunk -= shift
        chunk /= scale
        out[i : i + _CHUNK] = chunk
    return out


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches :func:`iterate_batches` yields for ``n`` examples.

    Args:
      n: number of examples, ``>= 0``.
      batch_size: ``>= 1``.
      drop_last: drop the final partial batch.

    Returns:
      ``n // batch_size`` if ``drop_last`` else ``ceil(n / batch_size)``.
    """
    n = _as_int(n, "n")
    batch_size = _as_int(batch_size, "batch_size")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    return n // batch_size if drop_last else -(-n // batch_size)


def shuffle_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of epoch ``epoch``: ``default_rng([seed, epoch]).permutation(n)``.

    :func:`iterate_batches` yields ``order[b * B : (b + 1) * B]`` as batch ``b``; the training
    loop gathers the same rows on the device, so both see one data order.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x, y)`` minibatches on the host, in an order fixed by ``(seed, epoch)``.

    The order is ``np.random.default_rng([seed, epoch]).permutation(N)``: reproducible, and
    different for each epoch.

    Args:
      x: ``[N, ...]`` inputs.
      y: ``[N]`` labels.
      batch_size: ``1 <= batch_size <= N``.
      seed: non-negative seed of the shuffle.
      epoch: non-negative epoch index, mixed into the seed.
      shuffle: False keeps the stored order.
      drop_last: drop the final partial batch, so every batch has ``batch_size`` examples
        (one static shape under ``jax.jit``).

    Yields:
      ``(x_batch [B, ...], y_batch [B])`` with ``B == batch_size`` (the last may be smaller
      when ``drop_last`` is False); :func:`num_batches` batches in all.

    Raises:
      ValueError: lengths differ, or ``batch_size``, ``seed`` or ``epoch`` is out of range.

    Example:
      >>> x, y = np.zeros((10, 2)), np.arange(10)
      >>> [len(b) for _, b in iterate_batches(x, y, 4, seed=0, epoch=0, drop_last=False)]
      [4, 4, 2]
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"iterate_batches: {n} inputs but {len(y)} labels")
    batch_size = _as_int(batch_size, "batch_size")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} out of range: need 1 <= batch_size <= {n}")
    seed, epoch = _as_int(seed, "seed"), _as_int(epoch, "epoch")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed={seed} and epoch={epoch} must be >= 0")
    order = shuffle_order(n, seed=seed, epoch=epoch) if shuffle else None
    # Arguments are checked above, eagerly; the generator below only slices.
    return _batches(x, y, batch_size, order, num_batches(n, batch_size, drop_last))


def _batches(x, y, batch_size, order, count):
    for b in range(count):
        if order is None:
            sl = slice(b * batch_size, (b + 1) * batch_size)
            yield x[sl], y[sl]
        else:
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield x[idx], y[idx]
