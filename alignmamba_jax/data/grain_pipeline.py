"""Batches from a random-access source (TFDS `as_data_source()` split) with grain, sharded per process.

Each process reads only its shard (grain.ShardOptions(shard_index=process_index, shard_count=process_count)):
shards are disjoint and, for a given seed, every process sees the same deterministic sequence of its own
records, so multi-host training needs no coordination to split the data.
"""
from __future__ import annotations

import grain.python as grain
import numpy as np

from alignmamba_jax.data.validate import as_array


class _ToContract(grain.MapTransform):
    """A TFDS record -> the contract's per-example keys (ids as str)."""

    def map(self, record):
        out = {k: as_array(v) for k, v in record.items() if k != "ids"}
        ids = record["ids"]
        out["ids"] = np.asarray(ids.decode() if isinstance(ids, bytes) else str(ids))
        return out


def make_loader(source, batch_size, *, seed=0, shuffle=True, num_epochs=1, process_index=None,
                process_count=None, drop_remainder=True, worker_count=0):
    """A grain.DataLoader over `source` yielding dicts of stacked arrays (batch_size per process).

    process_index / process_count default to jax.process_index() / jax.process_count().
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: expected a value in [0, {process_count}), found {process_index}")
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                          drop_remainder=True),
        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[_ToContract(), grain.Batch(batch_size, drop_remainder=drop_remainder)],
                            worker_count=worker_count)
