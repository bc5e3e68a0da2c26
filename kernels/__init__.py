"""Selective-scan kernels: one public `selective_scan` dispatching to interchangeable backends, and the
single-step `selective_state_update` for decoding.

Backends (all share the signature of `selective_scan_reference`):
  reference          plain `lax.scan`, the ground truth                                      (reference.py)
  associative        `lax.associative_scan`, the baseline; materialises (batch, length, channels, state)
  chunked            sequential chunks + hand-written VJP keeping chunk-boundary states        (chunked.py)
  pallas_triton      Pallas GPU kernel on Pallas's Triton backend, deprecated by JAX 0.11 (pallas_triton.py)
  pallas_mosaic_gpu  Pallas GPU kernel on Mosaic GPU, sm_90+ (Hopper, Blackwell)       (pallas_mosaic_gpu.py)
  pallas_tpu         Pallas TPU kernel (Mosaic)                                              (pallas_tpu.py)
  pallas             the platform's Pallas kernel: pallas_tpu on TPU; elsewhere pallas_triton where this JAX
                     has Pallas's Triton dialect, else pallas_mosaic_gpu
  cpu_ffi            C++ kernel on XLA's CPU backend through XLA's FFI, built on first use     (cpu_ffi.py)
  auto               cpu -> cpu_ffi (chunked where it cannot be built), gpu -> pallas, tpu -> pallas
`backends()` says which backends can run here, why the others cannot, and what `auto` picks.
On GPU `pallas` (and so `auto`) prefers the Triton kernel while JAX has it: until a GPU has measured both, it is
the safer choice (simpler code with no asynchronous copies or barriers to get wrong, and it runs on any CUDA GPU,
where the Mosaic GPU kernel needs sm_90+); where the Triton dialect is gone it falls back to Mosaic GPU, and on a
GPU older than sm_90 without Triton `auto` falls back to `chunked` (`pallas` then says why it cannot run).
Off their platform the Pallas kernels run in interpret mode (slow; for tests). The Pallas backends import their
Pallas dialect only when asked for, so a JAX without one (e.g. without Triton) still serves every other backend.
`tuned_backend(name, **tunables)` builds a Pallas backend with non-default tunables (block and chunk sizes) for
sweeps; `TUNABLE_BACKENDS` lists them.
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
from alignmamba_jax.kernels.validation import BACKENDS, validate_scan_inputs, validate_step_inputs

_AUTO = {"cpu": "cpu_ffi", "gpu": "pallas", "cuda": "pallas", "rocm": "pallas", "tpu": "pallas"}
# Pallas backend -> (module, core, whether the core reads and writes the inputs' own dtypes, see `make_backend`);
# each module also defines TUNABLES, the defaults of its core's keywords.
_PALLAS = {"pallas_triton": ("pallas_triton", "pallas_triton_core", False),
           "pallas_mosaic_gpu": ("pallas_mosaic_gpu", "pallas_mosaic_gpu_core", True),
           "pallas_tpu": ("pallas_tpu", "pallas_tpu_core", False)}
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


def _gpu_pallas_backend():
    """pallas_triton where this JAX still has Pallas's Triton dialect (the safer kernel until a GPU has measured
    both, see the module docstring), else pallas_mosaic_gpu where the GPU can run it (sm_90+), else None."""
    try:
        _pallas_module("pallas_triton")
    except RuntimeError:
        return "pallas_mosaic_gpu" if _pallas_module("pallas_mosaic_gpu").device_supported(jax.devices()[0]) else None
    return "pallas_triton"


def _implementation(backend):
    platform = jax.default_backend()
    if backend == "auto":
        backend = _AUTO.get(platform, "chunked")
        if backend == "cpu_ffi" and not cpu_ffi.available()[0]:
            backend = "chunked"
        if backend == "pallas" and platform != "tpu":
            backend = _gpu_pallas_backend() or "chunked"
    if backend == "pallas":
        backend = "pallas_tpu" if platform == "tpu" else _gpu_pallas_backend() or "pallas_mosaic_gpu"
    if backend in _PALLAS:
        return _tuned(backend, ())
    return {"reference": selective_scan_reference, "associative": selective_scan_associative,
            "chunked": selective_scan_chunked, "cpu_ffi": cpu_ffi.selective_scan_cpu_ffi}[backend]


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
    chosen = _implementation("auto")
    report["auto"] = (True, next(name for name in ("reference", "associative", "chunked", "cpu_ffi", *_PALLAS)
                                 if report[name][0] and chosen is _implementation(name)))
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
    return _implementation(backend)(u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
                                    initial_state=initial_state, mask=mask,
                                    return_final_state=return_final_state)


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


__all__ = ["BACKENDS", "CPU_KERNELS", "TUNABLE_BACKENDS", "backends", "selective_scan", "selective_scan_reference", "selective_state_update",
           "tunables", "tuned_backend"]
