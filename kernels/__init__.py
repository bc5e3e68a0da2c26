"""Selective-scan kernels: one public `selective_scan` dispatching to interchangeable backends, and the
single-step `selective_state_update` for decoding.

The backends, each with the signature of `selective_scan_reference`, are the records of `registry.py`; this
module reads them for dispatch, `backends()` (which can run here, why the others cannot, what `auto` picks),
`tunables(name)` and `tuned_backend(name, **tunables)` (a Pallas backend with non-default tunables, for sweeps).
Two names choose per platform (`resolve_backend`): `pallas`, the platform's Pallas kernel, and `auto`, the
platform's default. Off their platform the Pallas kernels run in interpret mode (slow; for tests), and each
imports its Pallas dialect only when asked for, so a JAX without one still serves every other backend.

Which backend runs follows the platform being lowered for, never `jax.default_backend()`: under a mesh its
devices' platform, elsewhere one `lax.platform_dependent` branch per platform, so a program compiled ahead of
time for a TPU or GPU from a CPU host gets that platform's kernel. Under a mesh the kernels (Pallas and cpu_ffi)
run on each device's batch shard (`sharding.py`).
"""
import functools

import jax
import jax.numpy as jnp

from alignmamba_jax.kernels import registry
from alignmamba_jax.kernels.reference import selective_scan_reference
from alignmamba_jax.kernels.registry import BACKENDS, CPU_KERNELS, PLATFORMS, TUNABLE_BACKENDS
from alignmamba_jax.kernels.sharding import per_device_shard
from alignmamba_jax.kernels.validation import validate_scan_inputs, validate_step_inputs


def _tunable(name):
    if name not in TUNABLE_BACKENDS:
        raise ValueError(f"backend: expected one of {TUNABLE_BACKENDS} (the tunable Pallas backends), "
                         f"found {name!r}")
    return registry.REGISTRY[name]


def tunables(name):
    """The tunable keyword arguments of Pallas backend `name` with their defaults, e.g. {"chunk": 64, ...}."""
    return _tunable(name).tunables()


def tuned_backend(name, **settings):
    """Pallas backend `name` with some tunables changed; same signature as `selective_scan_reference`.

    Inputs are not validated (call `selective_scan` for that); meant for benchmarks that sweep block sizes.
    """
    unknown = sorted(set(settings) - set(tunables(name)))
    if unknown:
        raise ValueError(f"{name}: unknown tunables {unknown}; expected some of {sorted(tunables(name))}")
    return _tunable(name).implementation(**settings)


def _mosaic_gpu_can_run() -> bool:
    """On a machine with a GPU its compute capability decides (sm_90+); compiling for cuda anywhere else (ahead of
    time, from a CPU host) targets a GPU the kernel supports."""
    try:
        module = registry.REGISTRY["pallas_mosaic_gpu"].load()
    except RuntimeError:
        return False
    device = jax.devices()[0]
    return device.platform != "gpu" or module.device_supported(device)


def _gpu_pallas_backend(platform):
    """On CUDA, pallas_mosaic_gpu where it can run (sm_90+, or compiling for cuda from a host without a GPU);
    else pallas_triton while this JAX has Pallas's Triton dialect; else None (see the module docstring)."""
    if platform == "cuda" and _mosaic_gpu_can_run():
        return "pallas_mosaic_gpu"
    return "pallas_triton" if registry.REGISTRY["pallas_triton"].available()[0] else None


def default_platform() -> str:
    """The platform this process lowers for by default: cpu, cuda, rocm or tpu (`jax.default_backend()` says gpu
    for both GPU kinds)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def resolve_backend(backend="auto", platform=None) -> str:
    """The backend that `selective_scan(..., backend=backend)` runs when lowered for `platform` (one of
    `PLATFORMS`; default: `default_platform()`). `auto`: cpu -> cpu_ffi (chunked where it cannot be built),
    cuda/rocm -> the GPU Pallas kernel (or chunked where none can run), tpu -> pallas_tpu. `pallas`: the
    platform's Pallas kernel (on cpu the GPU kernel in interpret mode). Other names are themselves."""
    platform = platform or default_platform()
    if platform not in PLATFORMS:
        raise ValueError(f"platform: expected one of {PLATFORMS}, found {platform!r}")
    if backend == "auto":
        if platform == "cpu":
            return "cpu_ffi" if registry.REGISTRY["cpu_ffi"].available()[0] else "chunked"
        return "pallas_tpu" if platform == "tpu" else _gpu_pallas_backend(platform) or "chunked"
    if backend == "pallas":
        return "pallas_tpu" if platform == "tpu" else _gpu_pallas_backend(platform) or "pallas_mosaic_gpu"
    return backend


def _interpreted(name, platform) -> bool:
    return registry.REGISTRY[name].interpreted(platform)


def _platform_implementation(name, platform):
    """Backend `name` as lowered for `platform`: a Pallas kernel compiled on its own platform, else interpreted."""
    return registry.REGISTRY[name].implementation_for(platform)


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
    plain XLA), plus the default platform's interpreted kernel where it is plain JAX (`pure_interpreter`), so
    that one jitted function compiles to the TPU kernel for a TPU, the GPU kernel for cuda and the CPU's on
    CPU, and `jax.export` for several platforms keeps a branch each; but where the default platform runs a
    kernel in an interpreter with callbacks (tests, off every accelerator), that alone: those callbacks cannot
    share a `lax.platform_dependent` with compiled branches."""
    names = {p: resolve_backend(backend, p) for p in PLATFORMS}
    default = default_platform()
    platform = _mesh_platform()
    if platform is None and _interpreted(names[default], default) and \
            not registry.REGISTRY[names[default]].pure_interpreter:
        platform = default
    platforms = [platform] if platform else [p for p in PLATFORMS if not _interpreted(names[p], p) or p == default]
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
    report = {name: backend.available() for name, backend in registry.REGISTRY.items()}
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

    if any(registry.REGISTRY[name].per_device for name in backends.values()):
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
