"""Running a scan kernel on each device's shard of the batch under the active mesh.

XLA cannot split an opaque kernel call (a Pallas / Mosaic kernel or a custom call) across devices: Mosaic TPU
refuses to lower one inside a sharded program, and on GPU the partitioner gathers the global batch onto every
device and runs the kernel on all of it. `per_device_shard` wraps the scan in `jax.shard_map` over the batch
axes of the mesh set with `jax.set_mesh` (what `train.py` and `aot.py` trace under), so each device runs the
kernel on its own rows, and the backward pass does the same; the parameters (A, D, delta_bias) are replicated
and their gradients summed over devices by shard_map's transpose. Why shard_map rather than
`custom_partitioning`: it is plain JAX that `jax.export` serialises (custom_partitioning's Python callback is
not), it needs no partitioning rules of its own for forward and backward, and under data parallelism the
batch axes are known. Outside any mesh, or inside a user's own shard_map, the scan runs as it is.
"""
import jax
from jax.sharding import PartitionSpec as P

# Positions in the argument tuple (u, delta, A, B, C, D, z, delta_bias, initial_state, mask) whose leading axis
# is the batch; the others are per-channel parameters.
_BATCH_MAJOR = (True, True, False, True, True, False, True, False, True, True)


def batch_axes(mesh, batch: int) -> tuple:
    """The mesh's axes, in order, that shard a batch of `batch` rows (each one's size divides what is left; the
    project's (data, fsdp) mesh shards the batch over both)."""
    axes, size = [], 1
    for name, axis_size in zip(mesh.axis_names, mesh.axis_sizes):
        if axis_size > 1 and batch % (size * axis_size) == 0:
            axes.append(name)
            size *= axis_size
    return tuple(axes)


def per_device_shard(scan, arrays):
    """`scan(arrays) -> (y, h_last)` run per device on the batch shards of the active mesh (see the module
    docstring); `arrays` holds None for absent options."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or getattr(mesh, "manual_axes", ()):
        return scan
    axes = batch_axes(mesh, arrays[0].shape[0])
    rows = P(axes) if axes else P()
    specs = tuple(None if x is None else (rows if major else P()) for x, major in zip(arrays, _BATCH_MAJOR))
    return jax.shard_map(scan, mesh=mesh, in_specs=(specs,), out_specs=(rows, rows), check_vma=False)
