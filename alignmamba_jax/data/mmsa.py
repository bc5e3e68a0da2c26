"""MMSA's feature pickles (`aligned_50.pkl`, `unaligned_50.pkl` for MOSI / MOSEI / SIMS) -> data contract.

Layout (MMSA / MMSA-FET releases): {"train","valid","test"} -> dict with
  text (N, 50, 768) float32 BERT features; text_bert (N, 3, 50) ids / attention mask / segment ids;
  audio (N, T_a, d_a), vision (N, T_v, d_v) (unaligned MOSI: 375x5 and 500x20, MOSEI: 500x74 and 500x35;
  aligned: T = 50); audio_lengths, vision_lengths (N,) (unaligned); regression_labels (N,) in [-3, 3];
  id (N,) 'video$_$clip'; raw_text, annotations, classification_labels (unused here).
Masks: text from text_bert[:, 1] (the attention mask) or, without text_bert, all-valid; audio / vision from
their lengths, or, for aligned files (T equal to the text length), the text mask (lengths ignored).
Non-finite features (the real audio holds -inf) become 0 and are counted in the returned `stats`.

Large files: `cache_dir` converts once (streaming, peak memory ~0.2 GB whatever the size, via `pickle_spill`) into
`cache_dir/<name>/<split>/<key>.npy` and returns read-only memory maps; later calls only map the files.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile

import numpy as np

from alignmamba_jax.data import validate
from alignmamba_jax.errors import UserError

SPLITS = validate.SPLITS
MODALITIES = ("text", "audio", "vision")
_log = logging.getLogger(__name__)


def _unpickle(path, spill_dir=None):
    if not os.path.isfile(path):
        raise UserError(f"{path}: " + ("a directory, expected a pickle file" if os.path.isdir(path) else
                                       "no such file"))
    try:
        if spill_dir is not None:
            from alignmamba_jax.data.pickle_spill import load_spilled
            return load_spilled(path, spill_dir)
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, MemoryError) as e:
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); the file may be truncated "
                        f"or not a pickle") from e


def _text_mask(split, where, n, length):
    if "text_bert" not in split:
        return np.ones((n, length), bool)
    tb = np.asarray(split["text_bert"])
    if tb.shape != (n, 3, length):
        raise UserError(f"{where}: key 'text_bert': expected shape ({n}, 3, {length}), found {tb.shape}")
    return tb[:, 1, :] > 0


def convert_split(split, where, stats):
    """One MMSA split dict -> contract dict (features zero-filled in place where writable)."""
    labels = validate.regression_labels(validate.require(split, "regression_labels", where), where,
                                        "regression_labels")
    n = labels.shape[0]
    text = validate.features(validate.require(split, "text", where), where, "text", n=n)
    out = {"text": text, "text_mask": _text_mask(split, where, n, text.shape[1])}
    for m in ("audio", "vision"):
        x = validate.features(validate.require(split, m, where), where, m, n=n)
        if x.shape[1] == text.shape[1]:  # aligned to the words: any *_lengths describe the raw streams
            mask = out["text_mask"]
        else:
            mask = validate.mask_from_lengths(validate.require(split, m + "_lengths", where), x.shape[1],
                                              where, m + "_lengths", n=n)
        out[m], out[m + "_mask"] = x, mask
    for m in MODALITIES:
        if not out[m].flags.writeable:
            out[m] = np.array(out[m])
        stats[f"{where.rsplit(':', 1)[-1]}/{m}_non_finite"] = validate.zero_non_finite(out[m], where, m)
    out["labels"] = labels
    out["ids"] = validate.ids(validate.require(split, "id", where), where, "id", n)
    return out


def _convert_all(data, path):
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a dict of splits {SPLITS}, found {type(data).__name__}")
    stats = {}
    splits = {s: convert_split(validate.require(data, s, path), f"{path}:{s}", stats) for s in SPLITS}
    replaced = sum(stats.values())
    if replaced:
        _log.warning("%s: replaced %d non-finite feature values by 0 (%s)", path, replaced,
                     {k: v for k, v in stats.items() if v})
    return splits, stats


def _cache_name(path):
    st = os.stat(path)
    return f"{os.path.basename(path)}-{st.st_size}-{int(st.st_mtime)}"


def _load_cached(final):
    splits = {}
    for s in SPLITS:
        d = os.path.join(final, s)
        splits[s] = {f[:-4]: np.load(os.path.join(d, f), mmap_mode="r") for f in sorted(os.listdir(d))}
    with open(os.path.join(final, "stats.pkl"), "rb") as f:
        return splits, pickle.load(f)


def load_mmsa_pickle(path, cache_dir=None, return_stats=False):
    """MMSA pickle at `path` -> {"train","valid","test"} -> contract split dict (see module docstring).

    With `cache_dir`, converts once to memory-mappable .npy files (atomic: a temp dir renamed into place)
    and returns read-only memory maps. `return_stats=True` also returns {"<split>/<m>_non_finite": count}.
    """
    path = os.fspath(path)
    if cache_dir is None:
        splits, stats = _convert_all(_unpickle(path), path)
        return (splits, stats) if return_stats else splits
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    final = os.path.join(cache_dir, _cache_name(path))
    if not os.path.isdir(final):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)
        try:
            splits, stats = _convert_all(_unpickle(path, spill_dir=os.path.join(tmp, "spill")), path)
            for s, arrays in splits.items():
                os.makedirs(os.path.join(tmp, s))
                for key, arr in arrays.items():
                    target = os.path.join(tmp, s, key + ".npy")
                    if isinstance(arr, np.memmap) and arr.dtype == np.float32 and os.path.dirname(
                            arr.filename).startswith(tmp):
                        arr.flush()
                        os.replace(arr.filename, target)
                    else:
                        np.save(target, np.ascontiguousarray(arr))
            del splits
            shutil.rmtree(os.path.join(tmp, "spill"))
            with open(os.path.join(tmp, "stats.pkl"), "wb") as f:
                pickle.dump(stats, f)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    splits, stats = _load_cached(final)
    return (splits, stats) if return_stats else splits
