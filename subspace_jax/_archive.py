"""The digest-sealed ``.npz`` archive behind every saved subspace model (one format).

:func:`~subspace_jax.save_subspace` (any model) and :func:`~subspace_jax.compress.save_compressed`
(the CLI's built-in models, with their configs) write the same file: a NumPy ``.npz`` holding a
JSON ``header`` and the arrays, sealed by a SHA-256 of the file in the zip comment and written
atomically. This module writes and verifies that archive, and holds what both loaders share:
the platform record, the parameter digest and probe, and the rebuilt-parameters check.
docs/compressed-format.md describes the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from subspace_jax._errors import UserError
from subspace_jax._results import atomic_write

PyTree = Any

FORMAT = "subspace-jax-compressed"
#: Version 3: one format for every model (keys, layout and pass-through collections recorded).
VERSION = 3
#: Versions this release reads. Version 1 (before file digests) is read with a warning.
READABLE_VERSIONS = (1, 2, 3)
#: The zip comment is this prefix and 64 hex digits: the SHA-256 of the file's other bytes.
DIGEST_PREFIX = b"sha256:"
_DIGEST_HEX = 64
_EOCD = b"PK\x05\x06"  # the zip end-of-central-directory record: 22 bytes, then the comment
_EOCD_SIZE = 22
#: ``params_probe``: this many random projections, drawn from this numpy seed, in blocks.
PROBE_COUNT = 8
PROBE_SEED = 0
_PROBE_BLOCK = 1 << 20
#: Rebuilt parameters within this relative distance of the saved ones differ by rounding only
#: (another platform's summation order, TF32 matmuls); farther ones are another model.
PROBE_TOLERANCE = 5e-3


class CompressedModelError(UserError):
    """A saved subspace model that cannot be trusted: empty, truncated, unreadable, altered
    after saving, incomplete or holding non-finite numbers. The message names the file."""


def prng_settings() -> dict:
    return {
        "impl": str(jax.config.jax_default_prng_impl),
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
    }


def platform_record() -> dict:
    """What the bit-exactness of the rebuilt parameters depends on, besides the PRNG."""
    import jaxlib

    from subspace_jax.bench import cpu_model_name

    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpu": cpu_model_name(),
    }


def platform_differences(header: Mapping[str, Any]) -> list[str]:
    """``"name 'saved' -> 'now'"`` for each recorded platform field or PRNG setting that
    differs (version 1 files record only ``jax_version`` and ``backend``)."""
    saved = header.get("platform") or {
        "jax_version": header["jax_version"],
        "backend": header["backend"],
    }
    now = platform_record()
    out = [
        f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(saved) if k in now and saved[k] != now[k]
    ]
    if header["prng"] != prng_settings():
        out.append(f"PRNG settings {header['prng']} -> {prng_settings()}")
    return out


def params_digest(params: PyTree) -> str:
    """SHA-256 of a parameter tree's leaves (flatten order, native bytes, with shapes)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def params_probe(params: PyTree) -> dict:
    """Random projections of a parameter tree, to measure how far another tree is from it.

    The leaves (flatten order) are read as one float64 vector ``theta`` of length D; row k of a
    ``(PROBE_COUNT, D)`` standard normal matrix V is drawn by
    ``numpy.random.default_rng(PROBE_SEED)``, block by block (each leaf in blocks of 2**20
    entries, each block ``standard_normal((PROBE_COUNT, size))``). Since
    ``E[(v . delta)^2] = ||delta||^2`` for a standard normal v,
    ``sqrt(mean_k ((V theta)_k - (V theta')_k)^2)`` estimates ``||theta - theta'||``.

    Returns:
      ``{"values": V theta (PROBE_COUNT floats), "norm": ||theta||}``.
    """
    rng = np.random.default_rng(PROBE_SEED)
    values = np.zeros(PROBE_COUNT)
    sq = 0.0
    for leaf in jax.tree_util.tree_leaves(params):
        flat = np.asarray(jax.device_get(leaf), np.float64).ravel()
        sq += float(flat @ flat)
        for start in range(0, flat.size, _PROBE_BLOCK):
            block = flat[start : start + _PROBE_BLOCK]
            values += rng.standard_normal((PROBE_COUNT, block.size)) @ block
    return {"values": [float(v) for v in values], "norm": float(np.sqrt(sq))}


def _probe_distance(saved: Mapping[str, Any], params: PyTree) -> float:
    """Estimated ``||params - saved|| / ||saved||`` from the saved :func:`params_probe`."""
    now = params_probe(params)
    diff = np.asarray(now["values"]) - np.asarray(saved["values"], np.float64)
    return float(np.sqrt(np.mean(diff**2)) / max(float(saved["norm"]), np.finfo(float).tiny))


def trees_equal(a: PyTree, b: PyTree) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        # Compare the bits (NaN-safe, -0.0 != 0.0).
        if x.tobytes() != y.tobytes():
            return False
    return True


def non_finite(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays holding a NaN or an infinity, with their counts."""
    out = []
    for name in sorted(arrays):
        a = arrays[name]
        if np.issubdtype(a.dtype, np.inexact):
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            if n:
                out.append(f"{name} ({n} of {a.size})")
    return out


def write_archive(path: str | Path, header: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """Write ``header`` and ``arrays`` as a digest-sealed ``.npz``, atomically.

    The low-level writer behind :func:`save_compressed` (tests use it to build altered files
    that still carry a valid digest). The archive is written to a temporary file beside
    ``path``; its zip comment is set to ``sha256:`` and the hex SHA-256 of every byte before
    those 64 digits; the file is fsynced and renamed to ``path``. On any failure ``path`` is
    left as it was and the temporary file is removed.

    Args:
      path: the destination; its folder must exist.
      header: the JSON header (stored as the ``uint8`` array ``header``).
      arrays: the other arrays, by name.
    """
    raw = np.frombuffer(json.dumps(dict(header), sort_keys=True).encode("utf-8"), np.uint8)
    with atomic_write(path, "w+b") as f:
        np.savez(f, header=raw, **arrays)
        with zipfile.ZipFile(f, "a") as zf:
            zf.comment = DIGEST_PREFIX + b"0" * _DIGEST_HEX  # a placeholder of the final size
        size = f.seek(0, os.SEEK_END)
        digest = _sha256_of_prefix(f, size - _DIGEST_HEX)
        f.seek(size - _DIGEST_HEX)
        f.write(digest.encode("ascii"))


def _sha256_of_prefix(f, n: int) -> str:
    """Hex SHA-256 of the first ``n`` bytes of the open binary file ``f`` (moves its position)."""
    h = hashlib.sha256()
    f.seek(0)
    left = n
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise EOFError("file shorter than expected")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _check_digest(f, size: int, name: str) -> bool:
    """Verify the file digest in the zip comment of the open file ``f`` of ``size`` bytes.

    Returns:
      True when the digest is present and matches; False for a complete zip archive without a
      comment (a file written before digests, or by hand).

    Raises:
      CompressedModelError: a digest that does not match, or an end that is neither.
    """
    tail_len = _EOCD_SIZE + len(DIGEST_PREFIX) + _DIGEST_HEX
    f.seek(max(0, size - tail_len))
    tail = f.read()
    if len(tail) >= _EOCD_SIZE and tail[-_EOCD_SIZE:][:4] == _EOCD and tail[-2:] == b"\0\0":
        return False
    comment_len = len(DIGEST_PREFIX) + _DIGEST_HEX
    if (
        len(tail) == tail_len
        and tail[:4] == _EOCD
        and int.from_bytes(tail[_EOCD_SIZE - 2 : _EOCD_SIZE], "little") == comment_len
        and tail[_EOCD_SIZE:].startswith(DIGEST_PREFIX)
    ):
        stored = tail[-_DIGEST_HEX:]
        actual = _sha256_of_prefix(f, size - _DIGEST_HEX).encode("ascii")
        if not hmac.compare_digest(stored, actual):
            raise CompressedModelError(
                f"compressed model {name} is damaged or was altered after saving: its SHA-256 "
                "does not match the digest stored in it"
            )
        return True
    raise CompressedModelError(
        f"compressed model {name} is incomplete or not a subspace-jax compressed model: it does "
        "not end with a zip archive's end record and digest (a truncated or partly written file?)"
    )


def check_fields(header: Mapping[str, Any], fields: Mapping[str, type], name: str, where: str):
    for key, kind in fields.items():
        if key not in header:
            raise CompressedModelError(f"compressed model {name}: the {where} lacks {key!r}")
        value = header[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CompressedModelError(
                f"compressed model {name}: the {where}'s {key!r} is {type(value).__name__} "
                f"{value!r:.60}, expected {kind.__name__}"
            )


def read_archive(path: str | Path) -> tuple[dict, dict[str, np.ndarray], bool]:
    """The header and arrays of a saved model, its digest and format checked.

    Checks, in order: the file exists and is a non-empty file, its digest (when it ends with
    one), that it parses as an ``.npz`` with a JSON ``header`` of this ``FORMAT`` and a
    readable version, and that a version >= 2 file carried a digest. The caller checks the
    header's fields.

    Returns:
      ``(header, arrays, has_digest)``.

    Raises:
      FileNotFoundError: no such file.
      CompressedModelError: anything wrong with the file.
    """
    path = Path(path)
    name = repr(str(path))
    if not path.exists():
        raise FileNotFoundError(f"compressed model {name} does not exist")
    if not path.is_file():
        raise CompressedModelError(f"compressed model {name} is not a file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CompressedModelError(
                f"compressed model {name} is empty (0 bytes): an interrupted save? Save it again"
            )
        has_digest = _check_digest(f, size, name)
        f.seek(0)
        arrays = _load_npz(f, name)
    header = _parse_header(arrays, name)
    if header["version"] >= 2 and not has_digest:
        raise CompressedModelError(
            f"compressed model {name} has no digest (format version {header['version']} files "
            "end with one): it was rewritten by another tool or damaged; it cannot be verified"
        )
    return header, arrays, has_digest


def _load_npz(f, name: str) -> dict[str, np.ndarray]:
    try:
        z = np.load(f, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # any failure to parse these bytes is the file's fault
        raise CompressedModelError(
            f"cannot read compressed model {name} (.npz): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _parse_header(arrays: dict[str, np.ndarray], name: str) -> dict:
    """Pop and decode ``arrays["header"]``; check its format and version."""
    if "header" not in arrays:
        raise CompressedModelError(f"{name} is not a subspace-jax compressed model (no header)")
    try:
        header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressedModelError(f"compressed model {name} has a corrupt header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise CompressedModelError(f"{name} is not a {FORMAT} file (format {fmt!r})")
    version = header.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CompressedModelError(
            f"{name} has format version {version!r}; this subspace-jax reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return header


def check_probe(header: Mapping[str, Any], name: str) -> None:
    """The header's ``params_probe`` is ``{"values": PROBE_COUNT floats, "norm": float}``."""
    check_fields(header, {"params_probe": dict}, name, "header")
    probe = header["params_probe"]
    check_fields(probe, {"values": list, "norm": float}, name, "header's params_probe")
    if len(probe["values"]) != PROBE_COUNT or not all(
        isinstance(v, float) for v in probe["values"]
    ):
        raise CompressedModelError(
            f"compressed model {name}: the header's params_probe values are not "
            f"{PROBE_COUNT} numbers"
        )


def check_arrays(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], name: str) -> None:
    """Every array the header lists is there and finite."""
    missing = sorted(set(header["stored"]) - set(arrays))
    if missing:
        raise CompressedModelError(f"compressed model {name} lacks the arrays {missing}")
    bad = non_finite(arrays)
    if bad:
        raise CompressedModelError(
            f"compressed model {name} has non-finite values in {', '.join(bad)}: it was saved "
            "from a diverged run"
        )


def check_rebuilt(name: str, header: dict, params: PyTree, diffs: list[str], info: dict):
    """Rebuilt parameters that are not bit-equal to the saved ones: rounding or another model?

    With a probe (version 2): rounding (within :data:`PROBE_TOLERANCE`) is a warning, which
    names the platform differences if there are any; more is an error. Without one (version
    1): an error on the saving platform, a warning elsewhere.
    """
    where = f"saved on another platform ({'; '.join(diffs)})" if diffs else ""
    info["params_distance"] = None  # unknown without a probe
    if "params_probe" in header:
        dist = _probe_distance(header["params_probe"], params)
        info["params_distance"] = dist
        if dist > PROBE_TOLERANCE:
            why = (
                f"this platform does not rebuild the saved model: it was {where}; load it "
                f"with JAX {header['jax_version']} on {header['backend']}"
                if diffs
                else "its seed, configs or arrays were altered after saving"
            )
            raise CompressedModelError(
                f"compressed model {name}: the parameters rebuilt from it are another model "
                f"(relative distance {dist:.2g} from the saved ones): {why}"
            )
        warnings.warn(
            f"{name}: the rebuilt parameters differ from the saved ones by rounding only "
            f"(relative distance {dist:.1e})" + (f"; {where}" if diffs else ""),
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if not diffs:
        raise CompressedModelError(
            f"compressed model {name}: the parameters rebuilt from it differ from the saved "
            "ones on the platform it was saved on (same JAX, backend and PRNG settings): its "
            "seed, configs or arrays were altered after saving"
        )
    warnings.warn(
        f"{name}: the rebuilt parameters differ from the saved ones; {where}",
        RuntimeWarning,
        stacklevel=3,
    )
