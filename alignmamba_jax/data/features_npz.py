"""Per-modality feature sequences from any encoder, one .npz per split: AlignMamba-2's image tasks.

Layout: a directory with train.npz, valid.npz, test.npz, each holding, for every modality m (e.g. "image"
patches from a ViT / CNN grid, "depth" patches, "text" tokens from BERT):
  m          float32 (N, T_m, d_m)   right padded
  m_lengths  int     (N,)            valid steps of m (optional: absent = all T_m steps valid)
  labels     int     (N,)            class index in [0, num_classes)
  ids        str     (N,)            (optional)
E.g. NYU-Depth V2 scene classification: image + depth; MVSA-Single sentiment: image + text.
"""
from __future__ import annotations

import logging
import os
import zipfile

import numpy as np

from alignmamba_jax.data import validate
from alignmamba_jax.errors import UserError

SPLITS = validate.SPLITS
_RESERVED = ("labels", "ids")
_log = logging.getLogger(__name__)


def save_features_npz(directory, splits):
    """Write contract splits ({split: {m, m_mask, labels, ids}}) in this layout (atomic per file)."""
    os.makedirs(directory, exist_ok=True)
    for s, arrays in splits.items():
        out = {}
        for key, value in arrays.items():
            if key.endswith("_mask"):
                out[key[:-5] + "_lengths"] = np.asarray(value).sum(1).astype(np.int32)
            else:
                out[key] = np.asarray(value)
        tmp = os.path.join(directory, f".{s}.tmp.npz")
        np.savez(tmp, **out)
        os.replace(tmp, os.path.join(directory, f"{s}.npz"))


def load_features_npz(directory):
    """Directory in this layout -> {"train","valid","test"} -> contract split dict (modalities = all arrays
    other than labels, ids and *_lengths). Non-finite features become 0, with one warning naming the counts (as
    the MMSA loader does)."""
    directory = os.fspath(directory)
    splits, replaced = {}, {}
    for s in SPLITS:
        path = os.path.join(directory, f"{s}.npz")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file (expected one .npz per split {SPLITS})")
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from e
        labels = validate.class_labels(validate.require(raw, "labels", path), path, "labels")
        n = labels.shape[0]
        out = {}
        modalities = [k for k in raw if k not in _RESERVED and not k.endswith("_lengths")]
        if not modalities:
            raise UserError(f"{path}: no modality arrays found (keys {sorted(raw)})")
        for m in modalities:
            x = np.array(validate.features(raw[m], path, m, n=n))
            replaced[f"{s}/{m}_non_finite"] = validate.zero_non_finite(x, path, m)
            out[m] = x
            if m + "_lengths" in raw:
                out[m + "_mask"] = validate.mask_from_lengths(raw[m + "_lengths"], x.shape[1], path,
                                                              m + "_lengths", n=n)
            else:
                out[m + "_mask"] = np.ones(x.shape[:2], bool)
        out["labels"] = labels
        out["ids"] = validate.ids(raw["ids"], path, "ids", n) if "ids" in raw else np.array(
            [f"{s}_{i}" for i in range(n)])
        splits[s] = out
    if sum(replaced.values()):
        _log.warning("%s: replaced %d non-finite feature values by 0 (%s)", directory, sum(replaced.values()),
                     {k: v for k, v in replaced.items() if v})
    return splits
