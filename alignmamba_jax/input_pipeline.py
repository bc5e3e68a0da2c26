"""Batches for the training loop: which samples a step sees, and this process's slice of them.

The order of training samples is a pure function of (seed, step): epoch `e` is the permutation
`default_rng([seed, e])`, and step `s` takes consecutive rows of it (the last partial batch of an epoch is
dropped). Resuming at any step therefore reproduces the uninterrupted run exactly, and every process computes
the same global index list without talking to the others.

Each process gathers only the rows its devices hold (read from the in-memory or memory-mapped split) and
`jax.make_array_from_process_local_data` assembles the global, sharded `jax.Array`.
"""
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np

from alignmamba_jax.errors import UserError


def split_size(split: Mapping[str, np.ndarray]) -> int:
    return int(split["labels"].shape[0])


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    if num_examples < global_batch_size:
        raise UserError(
            f"train.batch_size={global_batch_size} is larger than the training split ({num_examples} examples)")
    return num_examples // global_batch_size


def train_indices(seed: int, step: int, num_examples: int, global_batch_size: int) -> np.ndarray:
    """Global row indices of the batch used at `step` (identical on every process)."""
    per_epoch = steps_per_epoch(num_examples, global_batch_size)
    epoch, position = divmod(int(step), per_epoch)
    order = np.random.default_rng([int(seed), epoch]).permutation(num_examples)
    return order[position * global_batch_size:(position + 1) * global_batch_size]


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> slice:
    """The contiguous block of batch rows held by this process's devices under `sharding`."""
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    starts, stops = [], []
    for index in index_map.values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_batch_size if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    covered = sorted(set(zip(starts, stops)))
    if sum(b - a for a, b in covered) != stop - start:
        raise ValueError(f"this process's batch rows are not contiguous: {covered}")
    return slice(start, stop)


def gather(split: Mapping[str, np.ndarray], keys: Sequence[str], indices: np.ndarray) -> dict:
    """Rows `indices` of the arrays `keys`; sorted reads keep memory-mapped files sequential."""
    order = np.argsort(indices, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    sorted_indices = indices[order]
    return {k: np.asarray(split[k][sorted_indices])[inverse] for k in keys}


def batch_keys(modalities: Sequence[str]) -> list:
    return [k for m in modalities for k in (m, m + "_mask")] + ["labels"]


def to_global(local_batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
              global_batch_size: int) -> dict:
    """Assembles process-local rows into global arrays sharded along the batch axis."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
        for k, v in local_batch.items()
    }


def local_train_batch(split, modalities, seed, step, global_batch_size, rows: slice) -> dict:
    indices = train_indices(seed, step, split_size(split), global_batch_size)[rows]
    batch = gather(split, batch_keys(modalities), indices)
    batch["weights"] = np.ones(indices.shape, np.float32)
    return batch


def local_eval_batches(split, modalities, global_batch_size, rows: slice) -> Iterator[dict]:
    """Every example once, in order; the last batch is padded with weight-0 copies of row 0."""
    n = split_size(split)
    for start in range(0, n, global_batch_size):
        indices = np.arange(start, start + global_batch_size)
        weights = (indices < n).astype(np.float32)
        indices = np.where(indices < n, indices, 0)[rows]
        batch = gather(split, batch_keys(modalities), indices)
        batch["weights"] = weights[rows]
        yield batch
