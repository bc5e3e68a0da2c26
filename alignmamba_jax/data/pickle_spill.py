"""Unpickle a large pickle of numpy arrays without holding its arrays in memory.

`load_spilled(path, out_dir)` streams every large byte string of the pickle (an ndarray's data, protocols 3-5)
straight into a .npy file under `out_dir`, in 64 MiB chunks, and returns the pickle's structure with those
arrays as writable memory maps. The unpickler's memo keeps a reference to every byte string until the end of
the load, so with the standard unpickler a 13 GB MMSA MOSEI pickle would sit in memory in full; here the memo
only holds small placeholders and peak memory stays near one chunk. Byte strings below 64 KiB and
protocol-2 pickles (data as latin-1 text) take the ordinary in-memory path. Names are restricted as in
`safe_pickle`: loading runs no code from the file.

The file cannot choose where anything is written: spill files are created only in `out_dir`, under names the
unpickler numbers, and BUILD (the opcode that sets an object's state) is refused on everything but the
unpickler's own array placeholders and dtypes, so a pickle cannot redirect a spill file by rewriting its
placeholder. Containers nested more than `MAX_DEPTH` deep are refused (a real feature pickle is 3 deep).
"""
from __future__ import annotations

import itertools
import math
import os
import pickle
import struct

import numpy as np

from alignmamba_jax.data.safe_pickle import BUILDERS, Refused, check_global

_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
_HEADER = 4096  # reserved .npy header bytes (a multiple of 64, as the format requires)
_CHUNK = 64 << 20
_MIN_SPILL = 64 << 10  # pickle frames are 64 KiB: larger byte strings are written outside them
MAX_DEPTH = 64


class OnDisk:
    """A byte string (then an array) the unpickler wrote to `path`, after a reserved .npy header. Only the
    unpickler makes these; the pickle cannot set their state (see `_SpillingUnpickler.load_build`)."""

    __slots__ = ("path", "nbytes")

    def __init__(self, path, nbytes):
        self.path, self.nbytes = path, nbytes

    def finish(self, dtype, shape, fortran):
        """Write the .npy header for the data already in the file; return self."""
        dtype = np.dtype(dtype)
        if math.prod(int(s) for s in shape) * dtype.itemsize != self.nbytes:
            raise pickle.UnpicklingError(f"array of {shape} {dtype} does not match its {self.nbytes} data bytes")
        header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": bool(fortran),
                       "shape": tuple(int(s) for s in shape)})
        body = header.ljust(_HEADER - 10 - 1) + "\n"
        with open(self.path, "r+b") as f:
            f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1"))
        return self


class _SpilledArray:
    """Stands in for an ndarray during unpickling: its data either already is on disk or is written there."""

    def __init__(self, unpickler):
        self._unpickler = unpickler
        self.value = None

    def __setstate__(self, state):
        _, shape, dtype, fortran, raw = state if len(state) == 5 else (1, *state)
        if isinstance(raw, OnDisk):
            self.value = raw.finish(dtype, shape, fortran)
            return
        arr = np.ndarray.__new__(np.ndarray, (0,), np.uint8)
        arr.__setstate__(state)
        self.value = arr


class _SpillingUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, out_dir):
        super().__init__(file, encoding="latin1")
        self._out_dir = out_dir
        self._counter = itertools.count()

    def _bytes(self, n):
        if n < _MIN_SPILL:
            return self.read(n)
        path = os.path.join(self._out_dir, f"array_{next(self._counter):05d}.npy")
        with open(path, "xb") as f:   # a new file: never one that was there, nor a link planted there
            f.write(b"\0" * _HEADER)
            left = n
            while left:
                chunk = self.read(min(left, _CHUNK))
                if not chunk:
                    raise EOFError(f"pickle data ends {left} bytes before the end of a {n}-byte string")
                f.write(chunk)
                left -= len(chunk)
        return OnDisk(path, n)

    def load_binbytes(self):
        (n,) = struct.unpack("<I", self.read(4))
        self.append(self._bytes(n))

    def load_binbytes8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(self._bytes(n))

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        b = self._bytes(n)
        self.append(b if isinstance(b, OnDisk) else bytearray(b))

    def load_build(self):
        """BUILD sets the state of the object below it: allowed on the array placeholders and dtypes this
        unpickler built, refused on anything else (a spill file's `OnDisk` above all)."""
        target = self.stack[-2]
        if not isinstance(target, (_SpilledArray, np.dtype)):
            raise Refused(f"refused to set the state of a {type(target).__name__}: a data pickle sets state only "
                          f"on numpy arrays and dtypes")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module, name):
        canonical = check_global(module, name)
        if (module, name) in _RECONSTRUCT:
            return lambda *args: _SpilledArray(self)
        if (module, name) in _FROMBUFFER:
            def frombuffer(buf, dtype, shape, order):
                if isinstance(buf, OnDisk):
                    return buf.finish(dtype, shape, order == "F")
                return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)
            return frombuffer
        return BUILDERS.get((canonical, name)) or super().find_class(canonical, name)


def _resolve(obj, depth=0):
    if depth > MAX_DEPTH:
        raise Refused(f"refused: containers nested more than {MAX_DEPTH} deep (a feature pickle is a dict of "
                      f"splits of arrays)")
    if isinstance(obj, _SpilledArray):
        obj = obj.value
    if isinstance(obj, OnDisk):
        return np.load(obj.path, mmap_mode="r+")
    if isinstance(obj, dict):
        return {k: _resolve(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, depth + 1) for v in obj)
    return obj


def load_spilled(path, out_dir):
    """Unpickle `path`, array data streamed to `out_dir/*.npy`; returns the structure with memory maps (r+)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "rb") as f:
        obj = _SpillingUnpickler(f, out_dir).load()
    return _resolve(obj)
