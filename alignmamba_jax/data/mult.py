"""MulT's pickles (`mosi_data.pkl`, `mosi_data_noalign.pkl`, `mosei_senti_data[_noalign].pkl`) -> data contract.

Layout (yaohungt/Multimodal-Transformer): {"train","valid","test"} -> dict with text (N, T, 300) GloVe,
audio (N, T_a, 74) COVAREP, vision (N, T_v, 35 or 47) Facet, labels (N, 1, 1) sentiment in [-3, 3],
id (N, ...) (rows such as (video, start, end), joined with '$_$'). The files carry no lengths: a time step is
valid when its feature vector is not all zero, and valid steps are moved to the front (the contract's right
padding) keeping their order. NaN / inf features become 0 (MulT does the same for NaN).
"""
from __future__ import annotations

import numpy as np

from alignmamba_jax.data import validate
from alignmamba_jax.data.mmsa import SPLITS, _unpickle
from alignmamba_jax.errors import UserError

MODALITIES = ("text", "audio", "vision")


def _right_pad(x):
    valid = np.any(x != 0, axis=-1)
    order = np.argsort(~valid, axis=1, kind="stable")
    return np.take_along_axis(x, order[:, :, None], axis=1), np.take_along_axis(valid, order, axis=1)


def load_mult_pickle(path, return_stats=False):
    """MulT pickle at `path` -> {"train","valid","test"} -> contract split dict (see module docstring)."""
    path = str(path)
    data = _unpickle(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a dict of splits {SPLITS}, found {type(data).__name__}")
    splits, stats = {}, {}
    for s in SPLITS:
        where = f"{path}:{s}"
        split = validate.require(data, s, path)
        labels = validate.regression_labels(validate.require(split, "labels", where), where, "labels")
        n = labels.shape[0]
        out = {}
        for m in MODALITIES:
            x = np.array(validate.features(validate.require(split, m, where), where, m, n=n))
            stats[f"{s}/{m}_non_finite"] = validate.zero_non_finite(x, where, m)
            out[m], out[m + "_mask"] = _right_pad(x)
        out["labels"] = labels
        out["ids"] = validate.ids(split["id"], where, "id", n) if "id" in split else np.array(
            [f"{s}_{i}" for i in range(n)])
        splits[s] = out
    return (splits, stats) if return_stats else splits
