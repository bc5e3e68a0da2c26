"""The `cpu_ffi` backend: the selective scan's recurrence as a C++ kernel on XLA's CPU backend, through XLA's FFI.

`csrc/selective_scan_cpu.cc` holds the forward and backward kernels (vectorized over 8 channels x state, time
sequential, tasks over batch x channel blocks on XLA's intra-op thread pool). This module builds it, registers
it with `jax.ffi.register_ffi_target` and wraps it as a core for `common.make_backend` under a custom VJP that
keeps only the state at the start of each chunk of `CHUNK` steps: nothing of size (batch, length, channels,
state) is ever written, the backward kernel recomputes a chunk's states from its boundary.

How it is built, and why this way: at first use (by any process that finds no built copy), with the C++17
compiler found as `$CXX` or `c++` / `g++` / `clang++`, against the FFI headers of the jax running it
(`jax.ffi.include_dir()`), into a cache directory (`$ALIGNMAMBA_CACHE_DIR`, else `$XDG_CACHE_HOME/alignmamba_jax`,
else `~/.cache/alignmamba_jax`), under a file name that hashes the source, the headers and the flags; later
processes load it with `ctypes` (about 20 s once, then nothing).

The cache heals: a library is compiled to a temporary name, loaded in a child process (a library that does not
load, or kills its loader, is refused there and never cached), renamed into place, and recorded in a sidecar
`<library>.sha256` (its size and checksum, also written through a temporary name). A process loads a cached
library only if it matches its sidecar; a truncated or otherwise changed library, or one without a sidecar, is
built again (loading a truncated library could kill the process with SIGBUS, hence the checks first). Every
cache error names the directory and `ALIGNMAMBA_CACHE_DIR`.

`make test`'s install step builds it there (`build_report()`). Building it in setup.py instead would compile
against whatever jax pip's isolated build environment resolved, not the one installed beside it (pip builds the
package before it installs the dependencies), so the headers could be newer than the XLA that loads the library;
a pyproject `build-system` on jaxlib would also download jaxlib into every build. Compiling against the running
jax needs no build dependency, works the same for an editable install and a wheel (the source ships as package
data) and never fails an install: where no compiler or no `jax.ffi` exists, `available()` says why and `auto`
uses `chunked`.

Portability: no `-march` flag; the kernels carry AVX-512, AVX2+FMA and baseline x86-64 versions chosen at load
time (`target_clones`), so a cache directory shared between machines holds a library that runs on each.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from alignmamba_jax.kernels.common import make_backend

SOURCE = pathlib.Path(__file__).parent / "csrc" / "selective_scan_cpu.cc"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=fast",
         "-Wno-psabi")
CHUNK = 64                      # steps between saved states: their memory is length / CHUNK states
LANES = 8                       # channels per kernel task (one vector), as in the C++ source
TARGETS = {"forward": "AlignmambaSelectiveScanForward", "backward": "AlignmambaSelectiveScanBackward"}
_FFI_NAMES = {k: f"alignmamba_selective_scan_{k}" for k in TARGETS}


def cache_dir():
    root = os.environ.get("ALIGNMAMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "alignmamba_jax")
    return pathlib.Path(root)


def _compiler():
    for name in ([os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no C++ compiler found (set CXX, or install g++ / clang++)"
                       if not os.environ.get("CXX") else f"CXX={os.environ['CXX']!r} is not an executable")


def _in_cache(reason):
    return f"{reason} (kernel cache {cache_dir()}: set ALIGNMAMBA_CACHE_DIR to use another directory)"


def library_path():
    """Where the library built from SOURCE against this jax's FFI headers lives (built or not)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode())
    for header in sorted((pathlib.Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api").glob("*.h")):
        digest.update(header.read_bytes())
    return cache_dir() / f"selective_scan_cpu-{digest.hexdigest()[:16]}.so"


def _checksum(path):
    """"<size> <sha256>" of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.getsize(path)} {digest.hexdigest()}"


def _sidecar(path):
    return path.with_name(path.name + ".sha256")


def _matches_sidecar(path) -> bool:
    """Whether the library at `path` is the one its sidecar records (size and checksum)."""
    try:
        return _sidecar(path).read_text().strip() == _checksum(path)
    except OSError:
        return False


def _load_test(path):
    """None if the library at `path` loads and has the kernels' symbols, in a child process (a truncated
    library can kill its loader with SIGBUS); else the reason, in one line."""
    code = "import ctypes, sys\nlibrary = ctypes.CDLL(sys.argv[1])\nfor name in sys.argv[2:]: getattr(library, name)"
    try:
        result = subprocess.run([sys.executable, "-c", code, str(path), *TARGETS.values()], capture_output=True,
                                text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "loading it did not finish in 120 s"
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        return f"loading it killed the process ({_signal_name(-result.returncode)})"
    lines = result.stderr.strip().splitlines()
    return f"it does not load ({lines[-1] if lines else f'exit status {result.returncode}'})"


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _write_atomic(path, text):
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _compile_error(compiler, stderr):
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    first = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no message")
    return f"compiling {SOURCE.name} with {compiler} failed: {first}"


def build():
    """Compiles SOURCE into `library_path()` unless a valid copy is there (see the module docstring); returns
    the path. Raises RuntimeError saying, in one line, what is missing (compiler, jax.ffi), the compiler's first
    error, or what is wrong with the cache."""
    if not hasattr(jax, "ffi"):
        raise RuntimeError(f"jax {jax.__version__} has no jax.ffi (needs jax >= 0.4.38)")
    target = library_path()
    if target.exists() and _matches_sidecar(target):
        return target
    compiler = _compiler()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a private name, then rename: concurrent processes each build and the last rename wins.
        fd, partial = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as error:
        raise RuntimeError(_in_cache(f"cannot write the kernel library: {error}")) from error
    command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", partial]
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            raise RuntimeError(f"cannot run the compiler {compiler}: {error.strerror}") from error
        if result.returncode != 0:
            raise RuntimeError(_compile_error(compiler, result.stderr))
        broken = _load_test(partial)
        if broken:
            raise RuntimeError(f"the library {compiler} built is unusable: {broken}; nothing was cached")
        checksum = _checksum(partial)
        os.replace(partial, target)
        _write_atomic(_sidecar(target), checksum + "\n")
    except OSError as error:
        raise RuntimeError(_in_cache(f"cannot write the kernel library: {error}")) from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.lru_cache(maxsize=None)
def _load():
    """(True, path) once the library is built, loaded and registered with XLA; (False, reason) otherwise."""
    try:
        path = build()
        library = ctypes.CDLL(str(path))
        for kind, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(_FFI_NAMES[kind], jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except OSError as error:
        return False, _in_cache(f"the kernel library does not load: {error}")
    except (RuntimeError, AttributeError) as error:
        return False, str(error)
    return True, str(path)


def available():
    """(True, library path) where the cpu_ffi kernels are usable, else (False, the reason). Builds on first call."""
    return _load()


def build_report():
    """One line for an install log: builds the kernels now (make test's install step) and says how it went."""
    ok, detail = available()
    return f"cpu_ffi: {'built ' if ok else 'unavailable, auto uses chunked: '}{detail}"


def _require_library():
    ok, detail = _load()
    if not ok:
        raise RuntimeError(f"backend='cpu_ffi' is unavailable: {detail}. Use backend 'chunked' (or 'auto', "
                           f"which falls back to it).")


def _forward(u, delta, A, B, C, h0, chunk):
    batch, length, channels = u.shape
    state = A.shape[1]
    n_chunks = -(-length // chunk)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    call = jax.ffi.ffi_call(_FFI_NAMES["forward"],
                            (f32(batch, length, channels), f32(batch, channels, state),
                             f32(n_chunks, batch, channels, state)),
                            vmap_method="sequential")
    return call(u, delta, A, B, C, h0, chunk=chunk)


def _backward_groups(batch, channels):
    """How many channel groups share the backward's batch rows out: enough tasks for every core, each group
    costing one (batch, length, state) slice of dB and of dC to sum afterwards."""
    blocks = -(-channels // LANES)
    return max(1, min(blocks, -(-2 * (os.cpu_count() or 1) // batch)))


@jax.custom_vjp
def _scan(u, delta, A, B, C, h0):
    """Without differentiation nothing needs keeping: one chunk as long as the sequence."""
    y, h_last, _ = _forward(u, delta, A, B, C, h0, u.shape[1])
    return y, h_last


def _scan_fwd(u, delta, A, B, C, h0):
    y, h_last, h_starts = _forward(u, delta, A, B, C, h0, CHUNK)
    return (y, h_last), (u, delta, A, B, C, h_starts)


def _scan_bwd(residuals, cotangents):
    u, delta, A, B, C, h_starts = residuals
    dy, dh_last = cotangents
    batch, length, channels = u.shape
    state = A.shape[1]
    groups = _backward_groups(batch, channels)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    call = jax.ffi.ffi_call(_FFI_NAMES["backward"],
                            (f32(batch, length, channels), f32(batch, length, channels),
                             f32(batch, channels, state), f32(groups, batch, length, state),
                             f32(groups, batch, length, state), f32(batch, channels, state)),
                            vmap_method="sequential")
    du, ddelta, dA_part, dB_part, dC_part, dh0 = call(u, delta, A, B, C, h_starts, dy.astype(jnp.float32),
                                                      dh_last.astype(jnp.float32), chunk=CHUNK)
    return du, ddelta, dA_part.sum(0), dB_part.sum(0), dC_part.sum(0), dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def cpu_ffi_core(u, delta, A, B, C, h0):
    _require_library()
    return _scan(u, delta, A, B, C, h0)


selective_scan_cpu_ffi = make_backend(cpu_ffi_core, "cpu_ffi")

