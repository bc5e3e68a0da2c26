"""Selective-scan kernels: one public `selective_scan` dispatching to interchangeable backends, and the
single-step `selective_state_update` for decoding.

Backends (all share the signature of `selective_scan_reference`):
  reference          plain `lax.scan`, the ground truth                                      (reference.py)
  associative        `lax.associative_scan`, the baseline; materialises (batch, length, channels, state)
  chunked            sequential chunks + hand-written VJP keeping chunk-boundary states        (chunked.py)
  pallas_triton      Pallas GPU kernel on Pallas's Triton backend, deprecated by JAX 0.11 (pallas_triton.py)
  pallas_mosaic_gpu  Pallas GPU kernel on Mosaic GPU, sm_90+ (Hopper, Blackwell)       (pallas_mosaic_gpu.py)
  pallas_tpu         Pallas TPU kernel (Mosaic)                                              (pallas_tpu.py)
  pallas             the platform's Pallas kernel: pallas_tpu on TPU, pallas_mosaic_gpu on CUDA sm_90+,
                     else pallas_triton where this JAX has Pallas's Triton dialect
  cpu_ffi            C++ kernel on XLA's CPU backend through XLA's FFI, built on first use     (cpu_ffi.py)
  auto               cpu -> cpu_ffi (chunked where it cannot be built), gpu -> pallas, tpu -> pallas
`backends()` says which backends can run here, why the others cannot, and what `auto` picks.
On CUDA `pallas` (and so `auto`) is the Mosaic GPU kernel where it can run (sm_90+; also when compiling for cuda
from a host without a GPU): compiled for H100 it has no spills and a static bound of 1.03x the roofline floor in
the forward (`benchmarks/kernel_report.py`, RESULTS), and it emits none of the Triton backend's deprecation
warnings. On an older GPU it is the Triton kernel while JAX has it, else `auto` falls back to `chunked` (and
`pallas` says why the Mosaic kernel cannot run); on ROCm the Triton kernel. On a CPU `pallas` interprets the
Triton kernel (tests).
Off their platform the Pallas kernels run in interpret mode (slow; for tests). The Pallas backends import their
Pallas dialect only when asked for, so a JAX without one (e.g. without Triton) still serves every other backend.
`tuned_backend(name, **tunables)` builds a Pallas backend with non-default tunables (block and chunk sizes) for
sweeps; `TUNABLE_BACKENDS` lists them.

Which backend runs follows the platform being lowered for, never `jax.default_backend()` (`resolve_backend`):
under a mesh its devices' platform, elsewhere one `lax.platform_dependent` branch per platform, so a program
compiled ahead of time for a TPU or GPU from a CPU host gets that platform's kernel. Under a mesh the kernels
(Pallas and cpu_ffi) run on each device's batch shard (`sharding.py`).
"""
import functools
import importlib

import jax
import jax.numpy as jnp

from alignmamba_jax.kernels import cpu_ffi
from alignmamba_jax.kernels.associative import selective_scan_associative
from alignmamba_jax.kernels.chunked import selective_scan_chunked
from alignmamba_jax.kernels.common import make_backend
from alignmamba_jax.kernels.reference import selective_scan_reference
from alignmamba_jax.kernels.sharding import per_device_shard
from alignmamba_jax.kernels.validation import BACKENDS, validate_scan_inputs, validate_step_inputs

# Pallas backend -> (module, core, whether the core reads and writes the inputs' own dtypes, see `make_backend`);
# each module also defines TUNABLES, the defaults of its core's keywords.
_PALLAS = {"pallas_triton": ("pallas_triton", "pallas_triton_core", False),
           "pallas_mosaic_gpu": ("pallas_mosaic_gpu", "pallas_mosaic_gpu_core", True),
           "pallas_tpu": ("pallas_tpu", "pallas_tpu_core", True)}
TUNABLE_BACKENDS = tuple(_PALLAS)
CPU_KERNELS = ("cpu_ffi",)      # compiled kernels for XLA's CPU backend (benchmarks time every one of them)
_MISSING_DIALECT = {
    "pallas_triton": "JAX 0.11 deprecated Pallas's Triton backend and later versions remove it; on GPUs use "
                     "backend='pallas' (the platform's Pallas kernel), or 'chunked' / 'associative' anywhere",
    "pallas_mosaic_gpu": "use backend 'pallas_triton', 'chunked' or 'associative'",
    "pallas_tpu": "use backend 'chunked' or 'associative'",
}


def _pallas_module(name):
    module = _PALLAS[name][0]
    try:
        return importlib.import_module(f"alignmamba_jax.kernels.{module}")
    except ImportError as error:
        raise RuntimeError(f"backend={name!r} is unavailable with jax {jax.__version__}: its Pallas dialect does "
                           f"not import ({error}). {_MISSING_DIALECT[name]}.") from error


def tunables(name):
    """The tunable keyword arguments of Pallas backend `name` with their defaults, e.g. {"chunk": 64, ...}."""
    if name not in _PALLAS:
        raise ValueError(f"backend: expected one of {TUNABLE_BACKENDS} (the tunable Pallas backends), "
                         f"found {name!r}")
    return dict(_pallas_module(name).TUNABLES)


@functools.lru_cache(maxsize=None)
def _tuned(name, items):
    _, core_name, native_dtypes = _PALLAS[name]
    core = getattr(_pallas_module(name), core_name)
    return make_backend(functools.partial(core, **dict(items)) if items else core, name, native_dtypes)


def tuned_backend(name, **settings):
    """Pallas backend `name` with some tunables changed; same signature as `selective_scan_reference`.

    Inputs are not validated (call `selective_scan` for that); meant for benchmarks that sweep block sizes.
    """
    unknown = sorted(set(settings) - set(tunables(name)))
    if unknown:
        raise ValueError(f"{name}: unknown tunables {unknown}; expected some of {sorted(tunables(name))}")
    return _tuned(name, tuple(sorted(settings.items())))


# Where each Pallas kernel runs compiled; lowered for any other platform it runs in interpret mode.
_KERNEL_PLATFORMS = {"pallas_triton": ("cuda", "rocm"), "pallas_mosaic_gpu": ("cuda",), "pallas_tpu": ("tpu",)}
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _mosaic_gpu_can_run() -> bool:
    """On a machine with a GPU its compute capability decides (sm_90+); compiling for cuda anywhere else (ahead of
    time, from a CPU host) targets a GPU the kernel supports."""
    try:
        module = _pallas_module("pallas_mosaic_gpu")
    except RuntimeError:
        return False
    device = jax.devices()[0]
    return device.platform != "gpu" or module.device_supported(device)


def _gpu_pallas_backend(platform):
    """On CUDA, pallas_mosaic_gpu where it can run (sm_90+, or compiling for cuda from a host without a GPU);
    else pallas_triton while this JAX has Pallas's Triton dialect; else None (see the module docstring)."""
    if platform == "cuda" and _mosaic_gpu_can_run():
        return "pallas_mosaic_gpu"
    try:
        _pallas_module("pallas_triton")
    except RuntimeError:
        return None
    return "pallas_triton"


def default_platform() -> str:
    """The platform this process lowers for by default: cpu, cuda, rocm or tpu (`jax.default_backend()` says gpu
    for both GPU kinds)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def resolve_backend(backend="auto", platform=None) -> str:
    """The backend that `selective_scan(..., backend=backend)` runs when lowered for `platform` (one of
    `PLATFORMS`; default: `default_platform()`). `auto`: cpu -> cpu_ffi (chunked where it cannot be built), cuda/rocm -> the GPU Pallas kernel (or
    chunked where none can run), tpu -> pallas_tpu. `pallas`: the platform's Pallas kernel (on cpu the GPU
    kernel in interpret mode). Other names are themselves."""
    platform = platform or default_platform()
    if platform not in PLATFORMS:
        raise ValueError(f"platform: expected one of {PLATFORMS}, found {platform!r}")
    if backend == "auto":
        if platform == "cpu":
            return "cpu_ffi" if cpu_ffi.available()[0] else "chunked"
        return "pallas_tpu" if platform == "tpu" else _gpu_pallas_backend(platform) or "chunked"
    if backend == "pallas":
        return "pallas_tpu" if platform == "tpu" else _gpu_pallas_backend(platform) or "pallas_mosaic_gpu"
    return backend


def _interpreted(name, platform) -> bool:
    return name in _PALLAS and platform not in _KERNEL_PLATFORMS[name]


def _platform_implementation(name, platform):
    """Backend `name` as lowered for `platform`: a Pallas kernel compiled on its own platform, else interpreted."""
    if name in _PALLAS:
        return _tuned(name, (("interpret", _interpreted(name, platform)),))
    return {"reference": selective_scan_reference, "associative": selective_scan_associative,
            "chunked": selective_scan_chunked, "cpu_ffi": cpu_ffi.selective_scan_cpu_ffi}[name]


def _mesh_platform():
    """The platform of the devices of the abstract mesh being traced under (`jax.set_mesh` / `train.under_mesh`),
    or None outside any mesh: a program traced for a mesh of TPUs (say, compiled ahead of time from a CPU host)
    is lowered for that platform only."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return "cuda" if platform == "gpu" else platform if platform in PLATFORMS else None


def _lowered_backends(backend):
    """{platform: backend name} for the platforms the program may be lowered for.

    Under a mesh, its devices' platform alone. Otherwise every platform whose implementation is compiled (or
    plain XLA), so that one jitted function compiles to the TPU kernel for a TPU, the GPU kernel for cuda and
    `chunked` on CPU, and `jax.export` for several platforms keeps a branch each; but where the default
    platform runs a kernel in interpret mode (tests, off every accelerator), that alone: an interpreter's
    callbacks cannot share a `lax.platform_dependent` with compiled branches."""
    names = {p: resolve_backend(backend, p) for p in PLATFORMS}
    platform = _mesh_platform()
    if platform is None and _interpreted(names[default_platform()], default_platform()):
        platform = default_platform()
    platforms = [platform] if platform else [p for p in PLATFORMS if not _interpreted(names[p], p)]
    return {p: names[p] for p in platforms}


@functools.lru_cache(maxsize=None)
def _branch(implementation, static_items):
    """`implementation` on the argument tuple, jitted so that its trace is cached: the branches of platforms other
    than the one running are traced too, and a model's layers of one shape then trace each kernel once."""
    static = dict(static_items)

    def call(arrays):
        u, delta, A, B, C, D, z, delta_bias, initial_state, mask = arrays
        return implementation(u, delta, A, B, C, D, z, delta_bias, initial_state=initial_state, mask=mask,
                              **static)

    call.__name__ = implementation.__name__
    return jax.jit(call)


def _run_per_platform(implementations, arrays, static):
    """Calls the implementation of the platform being lowered for (`lax.platform_dependent`; one implementation
    for every platform is called directly)."""
    branches = {p: _branch(impl, tuple(sorted(static.items()))) for p, impl in implementations.items()}
    if len(set(branches.values())) == 1:
        return next(iter(branches.values()))(arrays)
    return jax.lax.platform_dependent(arrays, **branches)


def backends():
    """{backend: (True, what it is) or (False, why it cannot run here)} for every concrete backend, plus
    "auto": (True, the backend it picks on this platform). Builds cpu_ffi if it is not built yet."""
    report = {name: (True, "XLA") for name in ("reference", "associative", "chunked")}
    report["cpu_ffi"] = cpu_ffi.available()
    for name in _PALLAS:
        try:
            _pallas_module(name)
            report[name] = (True, "Pallas kernel (interpret mode off its platform)")
        except RuntimeError as error:
            report[name] = (False, str(error))
    report["auto"] = (True, resolve_backend("auto"))
    return report


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False,
                   return_final_state=False, backend="auto", initial_state=None, mask=None):
    """Mamba's selective scan (mamba-ssm `selective_scan_ref` semantics), channels-last.

    u, delta, z: (batch, length, channels); A: (channels, state), real and negative; B, C: (batch, length,
    state); D, delta_bias: (channels,); initial_state: (batch, channels, state); mask: bool (batch, length),
    False marks an identity step (the state passes through unchanged, the output there is 0, whatever values,
    inf / NaN included, the inputs hold there). Returns y (batch, length, channels) in u.dtype, or (y, h_last)
    with h_last float32 (batch, channels, state) if return_final_state. Batch or length 0: an empty y and
    h_last = the initial state. The state and all accumulation are float32 whatever the input dtype.
    """
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, mask, backend)
    backends = _lowered_backends(backend)
    implementations = {p: _platform_implementation(name, p) for p, name in backends.items()}
    arrays = (u, delta, A, B, C, D, z, delta_bias, initial_state, mask)
    static = {"delta_softplus": delta_softplus, "return_final_state": True}

    def scan(arrays):
        return _run_per_platform(implementations, arrays, static)

    if any(name in _PALLAS or name in CPU_KERNELS for name in backends.values()):
        scan = per_device_shard(scan, arrays)
    y, h_last = scan(arrays)
    return (y, h_last) if return_final_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step of the scan. state: (batch, channels, state); x, dt, z: (batch, channels);
    B, C: (batch, state). Returns (y_t in x.dtype (batch, channels), new_state float32)."""
    validate_step_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    x32, dt32 = x.astype(jnp.float32), dt.astype(jnp.float32)
    if dt_bias is not None:
        dt32 = dt32 + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt32 = jax.nn.softplus(dt32)
    new_state = (jnp.exp(dt32[..., None] * A.astype(jnp.float32)) * state.astype(jnp.float32)
                 + (dt32 * x32)[..., None] * B.astype(jnp.float32)[:, None, :])
    y = jnp.einsum("bcn,bn->bc", new_state, C.astype(jnp.float32))
    if D is not None:
        y = y + x32 * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype), new_state


__all__ = ["BACKENDS", "CPU_KERNELS", "PLATFORMS", "TUNABLE_BACKENDS", "backends", "default_platform",
           "resolve_backend", "selective_scan", "selective_scan_reference", "selective_state_update", "tunables",
           "tuned_backend"]
