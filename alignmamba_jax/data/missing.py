"""Missing-modality protocols of the papers' baselines, as pure functions of (batch, rate, seed).

Every protocol has the signature f(batch, rate, seed, modalities, anchor) -> new batch: `batch` is a contract
split (or a slice of one: m (B, T, d), m + "_mask" (B, T), labels, ids); the result is a new dict in which
masked tokens / modalities have mask False and features 0; other keys pass through; the input is not
modified. Deterministic in `seed` (for per-step protocols, pass e.g. base_seed * 1_000_003 + step).

- random_tokens (MMSA / TFR-Net / LNLN): every modality loses `rate` of its valid tokens, chosen uniformly;
  exactly round(rate x eligible) tokens per modality over the batch. The anchor keeps its first and last valid
  tokens ([CLS] and [SEP] for BERT text), as LNLN does.
- imder (IMDer, NeurIPS 2023): whole modalities dropped for the whole batch. IMDer's training loop drops two
  modalities in a fraction MISS_2[rate] of the batches and one modality in MISS_1[rate] (its tables, rates
  0.1..0.7), the available ones drawn uniformly. Here the batch's case comes from u = frac(seed x golden
  ratio): over consecutive seeds (steps) the fractions match the table to O(log n / n) (a low-discrepancy
  sequence in place of IMDer's "first batches first" counter), and which modalities go comes from `seed`.
- per_sample (GCNet / MMIN): per sample and modality; exactly round(rate x B x M) (sample, modality) pairs
  missing, every sample keeps at least one modality (so rate <= (M - 1) / M).
"""
from __future__ import annotations

import numpy as np

MISS_2 = {0.1: 0.1, 0.2: 0.2, 0.3: 0.3, 0.4: 0.5, 0.5: 0.7, 0.6: 0.9, 0.7: 1.0}
MISS_1 = {0.1: 0.1, 0.2: 0.2, 0.3: 0.3, 0.4: 0.2, 0.5: 0.1, 0.6: 0.0, 0.7: 0.0}
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def _check(batch, rate, modalities, lo=0.0, hi=1.0):
    if not lo <= rate <= hi:
        raise ValueError(f"rate: expected a value in [{lo}, {hi}], found {rate}")
    for m in modalities:
        for key in (m, m + "_mask"):
            if key not in batch:
                raise ValueError(f"batch: missing key {key!r} (found {sorted(batch)})")


def _apply(batch, keep):
    """New batch with masks & keep and features zeroed where not kept; keep: {m: bool (B, T)}."""
    out = dict(batch)
    for m, k in keep.items():
        mask = np.asarray(batch[m + "_mask"]) & k
        out[m + "_mask"] = mask
        out[m] = np.where(mask[..., None], np.asarray(batch[m]), 0).astype(np.asarray(batch[m]).dtype)
    return out


def random_tokens(batch, rate, seed, modalities, anchor):
    _check(batch, rate, modalities)
    rng = np.random.default_rng(seed)
    keep = {}
    for m in modalities:
        mask = np.asarray(batch[m + "_mask"], bool)
        eligible = mask.copy()
        if m == anchor:
            lengths = mask.sum(1)
            rows = np.nonzero(lengths > 0)[0]
            eligible[rows, 0] = False
            eligible[rows, lengths[rows] - 1] = False
        flat = np.flatnonzero(eligible)
        drop = rng.choice(flat, size=int(round(rate * flat.size)), replace=False)
        k = np.ones(mask.size, bool)
        k[drop] = False
        keep[m] = k.reshape(mask.shape)
    return _apply(batch, keep)


def imder(batch, rate, seed, modalities, anchor):
    _check(batch, rate, modalities)
    rate = round(float(rate), 6)
    if rate == 0.0:
        return dict(batch)
    if rate not in MISS_2:
        raise ValueError(f"rate: IMDer's protocol is defined for rates {sorted(MISS_2)}, found {rate}")
    u = (int(seed) * _GOLDEN) % 1.0
    n_missing = 2 if u < MISS_2[rate] else (1 if u < MISS_2[rate] + MISS_1[rate] else 0)
    n_missing = min(n_missing, len(modalities) - 1)
    gone = np.random.default_rng(seed).choice(len(modalities), size=n_missing, replace=False)
    b = np.asarray(batch[modalities[0]]).shape[0]
    return _apply(batch, {modalities[i]: np.zeros((b, 1), bool) for i in gone})


def per_sample(batch, rate, seed, modalities, anchor):
    n_mod = len(modalities)
    _check(batch, rate, modalities, hi=(n_mod - 1) / n_mod)
    b = np.asarray(batch[modalities[0]]).shape[0]
    target = int(round(rate * b * n_mod))
    rng = np.random.default_rng(seed)
    present = np.ones((b, n_mod), bool)
    missing_per_sample = np.zeros(b, int)
    count = 0
    for pair in rng.permutation(b * n_mod):
        if count == target:
            break
        s, m = divmod(int(pair), n_mod)
        if missing_per_sample[s] < n_mod - 1:
            present[s, m] = False
            missing_per_sample[s] += 1
            count += 1
    return _apply(batch, {m: present[:, i:i + 1] for i, m in enumerate(modalities)})


PROTOCOLS = {"random_tokens": random_tokens, "imder": imder, "per_sample": per_sample}
