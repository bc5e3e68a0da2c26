"""MMSA's feature pickles (`aligned_50.pkl`, `unaligned_50.pkl` for MOSI / MOSEI / SIMS) -> data contract.

Layout (MMSA / MMSA-FET releases): {"train","valid","test"} -> dict with
  text (N, 50, 768) float32 BERT features; text_bert (N, 3, 50) ids / attention mask / segment ids;
  audio (N, T_a, d_a), vision (N, T_v, d_v) (unaligned MOSI: 375x5 and 500x20, MOSEI: 500x74 and 500x35;
  aligned: T = 50); audio_lengths, vision_lengths (N,) (unaligned); regression_labels (N,) in [-3, 3];
  id (N,) 'video$_$clip'; raw_text, annotations, classification_labels (unused here).
Masks: text from text_bert[:, 1] (the attention mask) or, without text_bert, all-valid; audio / vision from
their stored lengths whenever present, else (and where lengths exceed T in a file aligned to the words, T equal
to the text length: they then describe the raw streams) the text mask.
Non-finite features (the real audio holds -inf) become 0 and are counted in the returned `stats`.

Loading runs no code from the file (`safe_pickle`: numpy arrays in builtin containers only).
Large files: `cache_dir` converts once (streaming, peak memory ~0.2 GB whatever the size, via `pickle_spill`) into
`cache_dir/<name>-<content digest>/<split>/<key>.npy` and returns read-only memory maps; later calls only map the
files.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile

import numpy as np

from alignmamba_jax.data import safe_pickle, validate
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
            return safe_pickle.load(f)
    except safe_pickle.Refused as e:
        raise UserError(f"{path}: {e}") from None
    except (OverflowError, RecursionError) as e:
        raise UserError(f"{path}: refused: a value too large or containers nested too deep for feature data "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
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


def _stream_mask(split, m, length, text_mask, where, n):
    """Audio / vision mask from the stored `*_lengths`, or the text mask for a file aligned to the words (T equal
    to the text's) whose lengths are absent or exceed T (those describe the raw streams before alignment)."""
    key = m + "_lengths"
    aligned = length == text_mask.shape[1]
    if aligned and (key not in split or np.any(np.asarray(split[key]) > length)):
        return text_mask
    return validate.mask_from_lengths(validate.require(split, key, where), length, where, key, n=n)


def convert_split(split, where, stats):
    """One MMSA split dict -> contract dict (features zero-filled in place where writable)."""
    labels = validate.regression_labels(validate.require(split, "regression_labels", where), where,
                                        "regression_labels")
    n = labels.shape[0]
    text = validate.features(validate.require(split, "text", where), where, "text", n=n)
    out = {"text": text, "text_mask": _text_mask(split, where, n, text.shape[1])}
    for m in ("audio", "vision"):
        x = validate.features(validate.require(split, m, where), where, m, n=n)
        out[m], out[m + "_mask"] = x, _stream_mask(split, m, x.shape[1], out["text_mask"], where, n)
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


def _content_digest(path, cache_dir):
    """blake2b of the file's bytes, so that a changed file never maps an old conversion (`cp -p` and `rsync -a`
    keep size and mtime). Remembered in cache_dir/.digests.json per (device, inode, size, mtime, ctime): any
    write or copy changes ctime, so an unchanged file is not read again."""
    st = os.stat(path)
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    index_path = os.path.join(cache_dir, ".digests.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(identity), str):
        return index[identity]
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    index = {identity: digest.hexdigest()} | (index if isinstance(index, dict) else {})
    fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=cache_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(index, f)
    os.replace(tmp, index_path)   # atomic: a concurrent reader sees the old or the new index
    return index[identity]


@contextlib.contextmanager
def _locked(lock_path, blocking=True):
    """An exclusive flock on lock_path (created if missing) for the block; yields whether it was taken. The
    kernel drops the lock when its holder dies, even by kill -9. The holder removes the file before it lets go,
    so none is left behind; a process that then gets the lock of the removed file takes it again on a new one."""
    while True:
        with open(lock_path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                _log.info("%s: another process holds it (converting the same file); waiting", lock_path)
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if os.stat(lock_path).st_ino != os.fstat(f.fileno()).st_ino:
                    continue   # locked a file its holder removed: lock the one at the path now
            except FileNotFoundError:
                continue
            try:
                yield True
            finally:
                os.remove(lock_path)
            return


def _remove_stale_conversions(cache_dir):
    """Remove the .tmp-<name>-* folders of conversions whose process died: a live conversion holds .<name>.lock
    (created before its folder and removed after it, so a .tmp-* folder without one is not a conversion's and is
    left alone)."""
    for entry in os.listdir(cache_dir):
        lock = os.path.join(cache_dir, "." + entry[len(".tmp-"):].rsplit("-", 1)[0] + ".lock")
        if entry.startswith(".tmp-") and os.path.isdir(os.path.join(cache_dir, entry)) and os.path.exists(lock):
            with _locked(lock, blocking=False) as free:
                if free:
                    _log.info("%s: removing the folder of an interrupted conversion", os.path.join(cache_dir, entry))
                    shutil.rmtree(os.path.join(cache_dir, entry), ignore_errors=True)


def _load_cached(final):
    splits = {}
    for s in SPLITS:
        d = os.path.join(final, s)
        splits[s] = {f[:-4]: np.load(os.path.join(d, f), mmap_mode="r") for f in sorted(os.listdir(d))}
    with open(os.path.join(final, "stats.json"), encoding="utf-8") as f:
        return splits, json.load(f)


def _convert_into(path, tmp):
    """Convert the pickle at `path` into the folder `tmp` (<split>/<key>.npy and stats.json)."""
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
    with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f)


def load_mmsa_pickle(path, cache_dir=None, return_stats=False):
    """MMSA pickle at `path` -> {"train","valid","test"} -> contract split dict (see module docstring): per
    modality m in text, audio, vision, m float32 (N, T_m, d_m) and m + "_mask" bool (N, T_m); "labels" float32
    (N,); "ids" (N,). A missing file, a file of another layout or one holding anything but arrays and builtin
    containers raises a UserError naming it.

    With `cache_dir`, converts once to memory-mappable .npy files in cache_dir/<file name>-<content digest>/ and
    returns read-only memory maps. The conversion is written to a .tmp-* folder renamed into place, under a lock:
    a second process converting the same file waits and then maps the finished folder, and the folder of a
    conversion killed midway is removed by the next load. `return_stats=True` also returns
    {"<split>/<m>_non_finite": count}.
    """
    path = os.fspath(path)
    if cache_dir is None:
        splits, stats = _convert_all(_unpickle(path), path)
        return (splits, stats) if return_stats else splits
    if not os.path.isfile(path):
        _unpickle(path)   # the error for a missing file or a directory
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    _remove_stale_conversions(cache_dir)
    name = f"{os.path.basename(path)}-{_content_digest(path, cache_dir)}"
    final = os.path.join(cache_dir, name)
    if not os.path.isdir(final):
        with _locked(os.path.join(cache_dir, f".{name}.lock")):
            if not os.path.isdir(final):   # else another process converted it while this one waited
                tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir)
                try:
                    _convert_into(path, tmp)
                    os.replace(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    splits, stats = _load_cached(final)
    return (splits, stats) if return_stats else splits
