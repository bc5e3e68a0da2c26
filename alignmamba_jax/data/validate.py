"""Checks and conversions shared by the loaders: every error names where (file:split), the key, and the
expected vs found value, so a user with a malformed file knows what to fix."""
from __future__ import annotations

import logging
import mmap

import numpy as np

LABEL_RANGE = (-3.0, 3.0)
_log = logging.getLogger(__name__)


def as_array(value):
    """A decoded record field as a NumPy array (TFDS decodes scalar float32 features to Python floats)."""
    return np.asarray(value, np.float32) if isinstance(value, float) else np.asarray(value)


def require(mapping, key, where):
    if not hasattr(mapping, "keys"):
        raise ValueError(f"{where}: expected a dict of arrays, found {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{where}: missing key {key!r} (found keys {sorted(map(str, mapping.keys()))})")
    return mapping[key]


def features(x, where, key, ndim=3, n=None, length=None, dim=None):
    """float32 view/copy of a (N, T, d) feature array, shape-checked (memory maps stay memory maps)."""
    x = np.asanyarray(x)
    if x.ndim != ndim or (n is not None and x.shape[0] != n) or (length is not None and x.shape[1] != length) \
            or (dim is not None and x.shape[2] != dim):
        expect = (n if n is not None else "N", length if length is not None else "T", dim if dim is not None else "d")
        raise ValueError(f"{where}: key {key!r}: expected shape {expect[:ndim]}, found {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: key {key!r}: expected floating point features, found dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def zero_non_finite(x, where, key):
    """Replace non-finite entries by 0 in place when writable (the real MMSA audio holds -inf); return count.

    Chunked (no full-size temporary); for a memory map, the scanned pages are released from this process
    after each chunk, so scanning a 13 GB file does not grow the resident set by 13 GB.
    """
    count = 0
    flat = x.reshape(x.shape[0], -1)
    mapped = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
    rows = max(1, (64 << 20) // max(1, flat.shape[1] * flat.itemsize))
    for start in range(0, flat.shape[0], rows):
        bad = ~np.isfinite(flat[start:start + rows])
        n_bad = int(bad.sum())
        if n_bad:
            if not x.flags.writeable:
                raise ValueError(f"{where}: key {key!r}: {n_bad} non-finite values in a read-only array")
            flat[start:start + rows][bad] = 0.0
            count += n_bad
        if mapped is not None:
            mapped.flush()
            mapped.madvise(mmap.MADV_DONTNEED)  # shared file mapping: data stays in the file / page cache
    return count


def mask_from_lengths(lengths, length, where, key, n=None):
    """Right-padding mask (N, length). Lengths above `length` (sequences truncated after their length was
    recorded) are clipped with a warning; negative ones are an error."""
    lengths = np.asarray(lengths).reshape(-1)
    if n is not None and lengths.shape[0] != n:
        raise ValueError(f"{where}: key {key!r}: expected {n} lengths, found {lengths.shape[0]}")
    if lengths.size and np.any(lengths < 0):
        raise ValueError(f"{where}: key {key!r}: lengths must be >= 0, found minimum {lengths.min()}")
    if lengths.size and np.any(lengths > length):
        _log.warning("%s: key %r: %d lengths above the padded length %d (max %d) clipped to it", where, key,
                     int(np.sum(lengths > length)), length, int(lengths.max()))
    return np.arange(length)[None, :] < np.minimum(lengths.astype(np.int64), length)[:, None]


def regression_labels(y, where, key, n=None):
    y = np.asarray(y)
    if y.ndim > 1 and int(np.prod(y.shape[1:])) == 1:
        y = y.reshape(y.shape[0])
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise ValueError(f"{where}: key {key!r}: expected shape ({n if n is not None else 'N'},), found {y.shape}")
    y = y.astype(np.float32)
    if np.any(np.isnan(y)):
        raise ValueError(f"{where}: key {key!r}: {int(np.isnan(y).sum())} NaN labels "
                         f"(first at index {int(np.argmax(np.isnan(y)))})")
    lo, hi = LABEL_RANGE
    if y.size and (y.min() < lo or y.max() > hi):
        raise ValueError(f"{where}: key {key!r}: sentiment labels must lie in [{lo}, {hi}], found range "
                         f"[{y.min()}, {y.max()}]")
    return y


def class_labels(y, where, key, n=None, num_classes=None):
    y = np.asarray(y)
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise ValueError(f"{where}: key {key!r}: expected shape ({n if n is not None else 'N'},), found {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.any(np.isnan(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{where}: key {key!r}: class labels must be integers, found non-integer values")
    y = y.astype(np.int32)
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise ValueError(f"{where}: key {key!r}: class labels must lie in [0, {num_classes}), found range "
                         f"[{y.min()}, {y.max()}]")
    return y


def ids(values, where, key, n):
    values = np.asarray(values)
    if values.shape[:1] != (n,):
        raise ValueError(f"{where}: key {key!r}: expected {n} ids, found shape {values.shape}")
    if values.ndim > 1:  # MulT stores (video, start, end) rows
        return np.array(["$_$".join(str(v) for v in row) for row in values.reshape(n, -1)])
    return values.astype(str)


def select(arrays, modalities, task, num_classes, where):
    """Check a loaded split against the data contract and keep only the requested modalities."""
    labels = require(arrays, "labels", where)
    n = len(labels)
    out = {}
    for m in modalities:
        x = require(arrays, m, where)
        mask = require(arrays, m + "_mask", where)
        if x.ndim != 3 or x.shape[0] != n:
            raise ValueError(f"{where}: key {m!r}: expected shape ({n}, T, d), found {x.shape}")
        if mask.shape != x.shape[:2] or mask.dtype != np.bool_:
            raise ValueError(f"{where}: key {m + '_mask'!r}: expected bool {x.shape[:2]}, "
                             f"found {mask.dtype} {mask.shape}")
        out[m] = x.astype(np.float32, copy=False)
        out[m + "_mask"] = mask
    if task == "regression":
        out["labels"] = regression_labels(labels, where, "labels", n)
    else:
        out["labels"] = class_labels(labels, where, "labels", n, num_classes)
    out["ids"] = ids(arrays["ids"], where, "ids", n) if "ids" in arrays else np.array(
        [str(i) for i in range(n)])
    return out
