"""Unpickle a large pickle of numpy arrays while holding at most one array in memory.

`load_spilled(path, out_dir)` writes every non-object ndarray of the pickle to its own .npy file under
`out_dir` as soon as the unpickler has read it, and returns the pickle's structure with those arrays replaced by
read-only memory maps. Peak memory is about the largest single array (the unpickler must materialise one
array's bytes), not the file: MMSA's MOSEI unaligned pickle is ~13 GB, its largest array ~2.5 GB.
"""
from __future__ import annotations

import itertools
import os
import pickle

import numpy as np

_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class OnDisk:
    """An array the unpickler wrote to `path` (.npy)."""

    def __init__(self, path):
        self.path = path


class _SpilledArray:
    """Stands in for an ndarray during unpickling; its state is written to disk, not kept."""

    def __init__(self, writer):
        self._writer = writer
        self.value = None

    def __setstate__(self, state):
        _, shape, dtype, fortran, raw = state if len(state) == 5 else (1, *state)
        if dtype.hasobject:
            arr = np.ndarray.__new__(np.ndarray, (0,), np.uint8)
            arr.__setstate__(state)
            self.value = arr
        else:
            self.value = self._writer(raw, dtype, tuple(shape), "F" if fortran else "C")


class _SpillingUnpickler(pickle.Unpickler):
    def __init__(self, file, out_dir):
        super().__init__(file, encoding="latin1")
        self._out_dir = out_dir
        self._counter = itertools.count()

    def _write(self, raw, dtype, shape, order):
        path = os.path.join(self._out_dir, f"array_{next(self._counter):05d}.npy")
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape, fortran_order=order == "F")
        flat = mm.reshape(-1, order="A")
        flat[:] = np.frombuffer(raw, dtype=dtype, count=flat.size)
        mm.flush()
        del mm, flat
        return OnDisk(path)

    def find_class(self, module, name):
        if (module, name) in _RECONSTRUCT:
            return lambda *args: _SpilledArray(self._write)
        if (module, name) in _FROMBUFFER:
            return lambda buf, dtype, shape, order: self._write(memoryview(buf).cast("B"), dtype, shape, order)
        return super().find_class(module, name)


def _resolve(obj):
    if isinstance(obj, _SpilledArray):
        obj = obj.value
    if isinstance(obj, OnDisk):
        return np.load(obj.path, mmap_mode="r+")
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def load_spilled(path, out_dir):
    """Unpickle `path`, arrays spilled to `out_dir/*.npy`; returns the structure with writable memory maps."""
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "rb") as f:
        obj = _SpillingUnpickler(f, out_dir).load()
    return _resolve(obj)
