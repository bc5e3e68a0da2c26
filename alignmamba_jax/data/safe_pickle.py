"""Unpickling that runs no code from the file: the field's feature pickles (MMSA, MulT) are numpy arrays in
builtin containers, so only what builds those may be named by a pickle.

A pickle can call only what it names through `find_class` (the GLOBAL, STACK_GLOBAL, INST, OBJ and EXT opcodes
all go through it): with the names restricted to numpy's array, dtype and scalar reconstructors and a few
builtin types, loading builds arrays, dicts, lists, tuples and scalars and nothing else. Any other name
(`os.system`, `builtins.eval`, a class of some package) is refused before it is imported. `bytearray` is
built only from bytes or text, as pickle writes it, never from a size (`bytearray(2**70)`).
"""
from __future__ import annotations

import pickle

_NUMPY = {(module, name)
          for core in ("numpy.core", "numpy._core")   # numpy 1.x and 2.x write the same functions under these
          for module, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                               (f"{core}.numeric", "_frombuffer"))}
ALLOWED = frozenset(_NUMPY | {("numpy", "ndarray"), ("numpy", "dtype"),
                              ("_codecs", "encode")}    # protocol 2 writes bytes as _codecs.encode(text, "latin1")
                    | {(builtins, name) for builtins in ("builtins", "__builtin__")      # Python 3 / Python 2 names
                       for name in ("set", "frozenset", "bytearray", "complex")})


class Refused(pickle.UnpicklingError):
    """The pickle asks for something a feature pickle never needs; the message says what and why."""


class RefusedGlobal(Refused):
    """The pickle names a class or function outside `ALLOWED`."""


def _bytearray(*args):
    """bytearray as pickle writes one (from bytes, or latin-1 text in protocol 2), never `bytearray(n)`: a size
    is not data, and 2**70 is an OverflowError, 2**40 a terabyte."""
    if args and not isinstance(args[0], (bytes, str)):
        raise Refused(f"refused bytearray({type(args[0]).__name__}): pickle writes a bytearray from its bytes, "
                      f"never from a size")
    return bytearray(*args)


# allowed names that are built by a stand-in with the same result for what pickle writes
BUILDERS = {(builtins, "bytearray"): _bytearray for builtins in ("builtins", "__builtin__")}


def check_global(module, name):
    """Raises RefusedGlobal unless `module.name` is one of the names a feature pickle is made of; returns the
    module to import it from (numpy 1.x's `numpy.core` names from `numpy._core`, which numpy >= 1.26 has, so that
    numpy 2 does not warn about its deprecated `numpy.core`)."""
    if (module, name) not in ALLOWED:
        raise RefusedGlobal(f"refused to load {module}.{name}: a data pickle may hold only numpy arrays, dtypes "
                            f"and scalars in builtin containers (loading runs no code from a data file)")
    return "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core.") else module


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler (the C one) whose lookups are restricted to `ALLOWED`."""

    def find_class(self, module, name):
        canonical = check_global(module, name)
        return BUILDERS.get((canonical, name)) or super().find_class(canonical, name)


def load(file):
    """Unpickle an open binary file (Python 2 pickles' byte strings as latin-1), names restricted to ALLOWED."""
    return SafeUnpickler(file, encoding="latin1").load()
