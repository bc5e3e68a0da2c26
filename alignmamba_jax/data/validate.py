"""Checks and conversions shared by the loaders: every error is a `UserError` naming where (file:split), the
key, and the expected vs found value, so a user with a malformed file knows what to fix.

Per split, `select` checks a loaded split against the data contract; across splits, `check_splits` checks
what no single split shows (all three present and non-empty, equal feature widths, right padding). Both run in
`load_splits`, for every loader, before any compilation.
"""
from __future__ import annotations

import logging
import mmap

import numpy as np

from alignmamba_jax.errors import UserError

SPLITS = ("train", "valid", "test")
LABEL_RANGE = (-3.0, 3.0)
_log = logging.getLogger(__name__)


def as_array(value):
    """A decoded record field as a NumPy array (TFDS decodes scalar float32 features to Python floats)."""
    return np.asarray(value, np.float32) if isinstance(value, float) else np.asarray(value)


def require(mapping, key, where):
    if not hasattr(mapping, "keys"):
        raise UserError(f"{where}: expected a dict of arrays, found {type(mapping).__name__}")
    if key not in mapping:
        raise UserError(f"{where}: missing key {key!r} (found keys {sorted(map(str, mapping.keys()))})")
    return mapping[key]


def features(x, where, key, ndim=3, n=None, length=None, dim=None):
    """float32 view/copy of a (N, T, d) feature array, shape-checked (memory maps stay memory maps)."""
    try:
        x = np.asanyarray(x)
    except ValueError as e:   # nested lists of unequal lengths
        raise UserError(f"{where}: key {key!r}: expected an array of shape (N, T, d), found ragged nested "
                        f"sequences ({e})") from None
    if x.ndim != ndim or (n is not None and x.shape[0] != n) or (length is not None and x.shape[1] != length) \
            or (dim is not None and x.shape[2] != dim):
        expect = (n if n is not None else "N", length if length is not None else "T", dim if dim is not None else "d")
        raise UserError(f"{where}: key {key!r}: expected shape {expect[:ndim]}, found {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{where}: key {key!r}: expected floating point features, found dtype {x.dtype}")
    if ndim == 3 and x.shape[1] == 0:
        raise UserError(f"{where}: key {key!r}: expected a padded length T >= 1, found shape {x.shape}")
    if ndim == 3 and x.shape[2] == 0:
        raise UserError(f"{where}: key {key!r}: expected a feature width d >= 1, found shape {x.shape}")
    return x.astype(np.float32, copy=False)


def zero_non_finite(x, where, key):
    """Replace non-finite entries by 0 in place when writable (the real MMSA audio holds -inf); return count.

    Chunked (no full-size temporary); for a memory map, the scanned pages are released from this process
    after each chunk, so scanning a 13 GB file does not grow the resident set by 13 GB.
    """
    count = 0
    flat = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # not -1: an empty split has nothing to infer from
    mapped = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
    rows = max(1, (64 << 20) // max(1, flat.shape[1] * flat.itemsize))
    for start in range(0, flat.shape[0], rows):
        bad = ~np.isfinite(flat[start:start + rows])
        n_bad = int(bad.sum())
        if n_bad:
            if not x.flags.writeable:
                raise UserError(f"{where}: key {key!r}: {n_bad} non-finite values in a read-only array")
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
        raise UserError(f"{where}: key {key!r}: expected {n} lengths, found {lengths.shape[0]}")
    if lengths.size and np.any(lengths < 0):
        raise UserError(f"{where}: key {key!r}: lengths must be >= 0, found minimum {lengths.min()}")
    if lengths.size and np.any(lengths > length):
        _log.warning("%s: key %r: %d lengths above the padded length %d (max %d) clipped to it", where, key,
                     int(np.sum(lengths > length)), length, int(lengths.max()))
    return np.arange(length)[None, :] < np.minimum(lengths.astype(np.int64), length)[:, None]


def _numeric(y, where, key, what):
    """`y` if its dtype is a number (bool, int, float; an object array of numbers is converted), else a
    UserError naming the dtype and the first value."""
    if y.dtype.kind == "O":
        try:
            return y.astype(np.float64)
        except (TypeError, ValueError):
            pass
    if y.dtype.kind not in "biuf":
        value = y.reshape(-1)[0] if y.size else None
        first = f" (first: {value.item() if isinstance(value, np.generic) else value!r})" if y.size else ""
        raise UserError(f"{where}: key {key!r}: {what} must be numbers, found dtype {y.dtype}{first}")
    return y


def regression_labels(y, where, key, n=None):
    y = np.asarray(y)
    if y.ndim > 1 and int(np.prod(y.shape[1:])) == 1:
        y = y.reshape(y.shape[0])
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise UserError(f"{where}: key {key!r}: expected shape ({n if n is not None else 'N'},), found {y.shape}")
    y = _numeric(y, where, key, "sentiment labels")
    bad = ~np.isfinite(y)
    if bad.any():
        raise UserError(f"{where}: key {key!r}: expected finite labels, found {int(bad.sum())} NaN / inf "
                        f"(first at index {int(np.argmax(bad))}: {y[np.argmax(bad)]})")
    lo, hi = LABEL_RANGE
    if y.size and (y.min() < lo or y.max() > hi):   # in the file's dtype: 1e300 would become inf in float32
        raise UserError(f"{where}: key {key!r}: sentiment labels must lie in [{lo}, {hi}], found range "
                        f"[{y.min()}, {y.max()}]")
    return y.astype(np.float32)


def class_labels(y, where, key, n=None, num_classes=None):
    """int32 class indices in [0, num_classes) (without num_classes: in int32's range), checked in the file's
    own dtype before the cast, so that an int64 2**32 + 1 is refused rather than read as class 1."""
    y = np.asarray(y)
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise UserError(f"{where}: key {key!r}: expected shape ({n if n is not None else 'N'},), found {y.shape}")
    y = _numeric(y, where, key, "class labels")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y)
        bad[~bad] = y[~bad] != np.round(y[~bad])
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(f"{where}: key {key!r}: class labels must be integers, found {int(bad.sum())} "
                            f"non-integer values (first at index {i}: {y[i]})")
    limit = num_classes if num_classes is not None else 2 ** 31
    if y.size and (y.min() < 0 or y.max() >= limit):
        allowed = f"[0, {num_classes - 1}] (data.num_classes={num_classes})" if num_classes is not None else \
            f"[0, {limit - 1}] (int32 class indices)"
        raise UserError(f"{where}: key {key!r}: class labels must lie in {allowed}, found range "
                        f"[{y.min()}, {y.max()}]")
    return y.astype(np.int32)


def ids(values, where, key, n):
    """(N,) or (N, ...) ids -> (N,) str; rows (MulT's (video, start, end)) joined with '$_$', bytes read as UTF-8."""
    values = np.asarray(values)
    if values.shape[:1] != (n,):
        raise UserError(f"{where}: key {key!r}: expected {n} ids, found shape {values.shape}")

    def text(v, index):
        if not isinstance(v, bytes):
            return str(v)
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: key {key!r}: expected UTF-8 text ids, found bytes {bytes(v)!r} at index {index} "
                            f"({e.reason} at byte {e.start})") from None

    if values.ndim > 1:  # MulT stores (video, start, end) rows
        return np.array(["$_$".join(text(v, i) for v in row) for i, row in enumerate(values.reshape(n, -1))])
    if values.dtype.kind in "SO":
        return np.array([text(v, i) for i, v in enumerate(values)], dtype=str).reshape(n)
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
            raise UserError(f"{where}: key {m!r}: expected shape ({n}, T, d), found {x.shape}")
        if mask.shape != x.shape[:2] or mask.dtype != np.bool_:
            raise UserError(f"{where}: key {m + '_mask'!r}: expected bool {x.shape[:2]}, "
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


def right_padded(mask, where, key):
    """Raises unless every row of `mask` is valid steps first, then padding (the contract's layout)."""
    mask = np.asarray(mask)
    after_padding = mask[:, 1:] & ~mask[:, :-1]
    if after_padding.any():
        rows = np.flatnonzero(after_padding.any(axis=1))
        raise UserError(f"{where}: key {key!r}: expected right padding (valid steps first, then padding), found "
                        f"a valid step after a padded one in {rows.size} examples (first: example {rows[0]}, "
                        f"step {int(np.argmax(after_padding[rows[0]])) + 1})")


def check_splits(splits, modalities, where):
    """Checks across the contract splits of one dataset: train, valid and test present and non-empty, each
    modality's feature width equal in all of them (the model is built from train's), masks right padded."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise UserError(f"{where}: expected splits {SPLITS}, found {sorted(splits)} (missing {missing})")
    for s in SPLITS:
        if len(splits[s]["labels"]) == 0:
            raise UserError(f"{where}:{s}: expected at least 1 example, found an empty split")
    for m in modalities:
        width = splits["train"][m].shape[2]
        for s in SPLITS:
            x = splits[s][m]
            if x.shape[2] != width:
                raise UserError(f"{where}:{s}: key {m!r}: expected feature width {width} (as in split 'train'), "
                                f"found {x.shape[2]} (shape {x.shape})")
            right_padded(splits[s][m + "_mask"], f"{where}:{s}", m + "_mask")
