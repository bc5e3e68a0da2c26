"""Writers of files in the field's exact layouts (MMSA and MulT pickles) with random content.

For tests, the loading benchmark, and users who want to check their setup before the real files arrive.
Content is noise; layout (keys, shapes, dtypes, right padding, -inf audio entries, id format) is the real one.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

# (T, d) per modality: MMSA {aligned_50, unaligned_50}.pkl, MulT {*_data, *_data_noalign}.pkl
MMSA_SHAPES = {
    ("mosi", False): {"text": (50, 768), "audio": (375, 5), "vision": (500, 20)},
    ("mosi", True): {"text": (50, 768), "audio": (50, 5), "vision": (50, 20)},
    ("mosei", False): {"text": (50, 768), "audio": (500, 74), "vision": (500, 35)},
    ("mosei", True): {"text": (50, 768), "audio": (50, 74), "vision": (50, 35)},
}
MMSA_SIZES = {"mosi": (1284, 229, 686), "mosei": (16326, 1871, 4659)}
MULT_SHAPES = {
    ("mosi", True): {"text": (50, 300), "audio": (50, 5), "vision": (50, 20)},
    ("mosi", False): {"text": (50, 300), "audio": (375, 5), "vision": (500, 20)},
    ("mosei", True): {"text": (50, 300), "audio": (50, 74), "vision": (50, 35)},
    ("mosei", False): {"text": (50, 300), "audio": (500, 74), "vision": (500, 35)},
}


def mmsa_split(n, shapes, aligned, rng, neg_inf_per_sample=2, split="train", alloc=np.zeros):
    """One split dict in MMSA's layout (see `alignmamba_jax.data.mmsa`); features from alloc(shape, dtype)."""
    t_text = shapes["text"][0]
    text_len = rng.integers(3, t_text + 1, n)
    out = {"raw_text": np.array([f"utterance {i}" for i in range(n)], dtype=object),
           "id": np.array([f"{split}video{i // 3}$_${i % 3}" for i in range(n)], dtype=object)}
    text_bert = np.zeros((n, 3, t_text), np.int64)
    text_bert[:, 1] = np.arange(t_text)[None] < text_len[:, None]
    text_bert[:, 0] = np.where(text_bert[:, 1] > 0, rng.integers(1000, 30000, (n, t_text)), 0)
    out["text_bert"] = text_bert
    for m, (t, d) in shapes.items():
        x = alloc((n, t, d), np.float32)
        lengths = text_len if (aligned or m == "text") else rng.integers(1, t + 1, n)
        for i in range(n):
            x[i, :lengths[i]] = rng.standard_normal((lengths[i], d), np.float32)
        if m == "text":  # BERT features of [PAD] positions are not zero in the real files
            x[:, :, :] += np.where(text_bert[:, 1, :, None] > 0, 0, 0.01).astype(np.float32)
        if m == "audio":
            for i in range(n):
                pos = rng.integers(0, lengths[i], neg_inf_per_sample)
                x[i, pos, rng.integers(0, d, neg_inf_per_sample)] = -np.inf
        out[m] = x
        if not aligned and m != "text":
            out[m + "_lengths"] = [int(v) for v in lengths]
    y = np.round(rng.uniform(-3.0, 3.0, n) * 3) / 3
    y[: max(1, n // 10)] = 0.0  # some exactly-neutral labels, as in the real data
    out["regression_labels"] = y.astype(np.float32)
    out["classification_labels"] = np.where(y < 0, 0, np.where(y == 0, 1, 2)).astype(np.float32)
    out["annotations"] = np.array(["Negative" if v < 0 else "Neutral" if v == 0 else "Positive" for v in y],
                                  dtype=object)
    return out


def write_mmsa_pickle(path, dataset="mosi", aligned=False, sizes=(8, 4, 4), seed=0, protocol=4,
                      scratch_dir=None):
    """Write an MMSA {aligned,unaligned}_50.pkl-layout pickle; returns the dict written.

    With `scratch_dir`, features are built in memory-mapped scratch files (for MOSEI-sized files: the writer
    then holds about one array's bytes, which pickling copies, instead of the whole dataset).
    """
    rng = np.random.default_rng(seed)
    shapes = MMSA_SHAPES[(dataset, aligned)]
    alloc = np.zeros
    if scratch_dir is not None:
        counter = iter(range(10 ** 6))

        def alloc(shape, dtype):
            f = os.path.join(scratch_dir, f"scratch_{next(counter)}.npy")
            return np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=shape).view(np.ndarray)
    data = {s: mmsa_split(n, shapes, aligned, rng, split=s, alloc=alloc)
            for s, n in zip(("train", "valid", "test"), sizes)}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return data


def write_mult_pickle(path, dataset="mosi", aligned=True, sizes=(8, 4, 4), seed=0, left_pad=True):
    """Write a MulT {mosi_data,mosi_data_noalign,...}.pkl-layout pickle (labels (N,1,1), ids (N,3))."""
    rng = np.random.default_rng(seed)
    data = {}
    for s, n in zip(("train", "valid", "test"), sizes):
        split = {}
        for m, (t, d) in MULT_SHAPES[(dataset, aligned)].items():
            x = np.zeros((n, t, d), np.float32)
            for i in range(n):
                k = int(rng.integers(1, t + 1))
                rows = slice(t - k, t) if left_pad else slice(0, k)
                x[i, rows] = rng.standard_normal((k, d)) + 0.5
            split[m] = x
        split["audio"][:1, -1, 0] = np.nan  # MulT files hold NaN features (none to set in an empty split)
        split["labels"] = rng.uniform(-3, 3, (n, 1, 1)).astype(np.float32)
        split["id"] = np.array([[f"video{i}", str(i), str(i + 1)] for i in range(n)])
        data[s] = split
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return data
