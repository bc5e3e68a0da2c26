"""Accelerators we do not have, as compile-only devices: TPU slices from libtpu's topologies, GPU nodes from
XLA's GPU target configs.

`target_devices("v5e-16")` returns 16 compile-only TPU devices and `target_devices("h100x8")` 8 compile-only
H100s; a program jitted over a mesh of them is compiled by the real XLA:TPU / Mosaic TPU compilers or by
XLA:GPU through ptxas, on a machine with neither (needs the `aot` extra: libtpu, the CUDA plugin and ptxas).
`prepare_compile_host()` must run before jax is first imported: it keeps the default backend on the CPU and
stops libtpu's metadata probing and the CUDA plugin's cuDNN check, which a compile-only host cannot satisfy.

Target names are the accelerator names users type: TPU `<generation>-<N>` (N chips for v5e / v6e, TensorCores
for the megacore v4 / v5p, i.e. 2 per chip, as Cloud TPU names them), GPU `<model>x<N>` (8 GPUs a host). The
figures (HBM, bandwidth, peak bf16 FLOP/s, SMs) are the vendors' published ones.
"""
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from typing import Optional

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str                 # "tpu" or "cuda"
    chips: int                    # devices in the mesh
    hbm_bytes: int                # per device
    hbm_bytes_per_s: float        # per device
    peak_flops: float             # per device, dense bf16
    topology: str                 # libtpu topology name, or "<partitions>x<hosts>x<devices per host>" on GPU
    chip_config: str = "default"  # TPU: "megacore" for v4 / v5p
    gpu: Optional[str] = None     # GPU: key of GPU_SPECS

    @property
    def hosts(self) -> int:
        return max(1, self.chips // (4 if self.platform == "tpu" else 8))


# GPU target configs (xla GpuTargetConfigProto, text format): the device description XLA:GPU compiles for.
_GPU_SPEC = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{name}"
"""
# name -> (device description, SMs, HBM bytes as the driver reports them, HBM bytes/s, dense bf16 FLOP/s)
GPU_SPECS = {
    "h100": ("NVIDIA H100 80GB HBM3", 132, 84_978_434_048, 3.35e12, 989e12),
    "h200": ("NVIDIA H200", 132, 150_754_820_096, 4.8e12, 989e12),
}


def gpu_target_config(gpu: str) -> str:
    name, sms, memory, bandwidth, _ = GPU_SPECS[gpu]
    return _GPU_SPEC.format(name=name, sms=sms, memory=memory, bandwidth=int(bandwidth))


# TPU generation -> (HBM GiB, HBM bytes/s, dense bf16 FLOP/s per chip, megacore: the name counts 2 cores a chip,
# topology dimensions)
TPU_SPECS = {
    "v4": (32, 1.2e12, 275e12, True, 3),
    "v5e": (16, 8.19e11, 197e12, False, 2),
    "v5p": (95, 2.765e12, 459e12, True, 3),
    "v6e": (32, 1.64e12, 918e12, False, 2),
}


MIB = 2 ** 20
# TPU generation -> figures of one TensorCore, for the static bounds of compiled kernels
# (`benchmarks/kernel_report.py`):
#   clock_hz: the TensorCore clock: the published peak bf16 FLOP/s over the MXUs' multiply-adds per clock
#     (v4: 275e12 / (2 cores x 4 MXUs x 128 x 128 x 2); v5e: 197e12 / (4 x 128 x 128 x 2); v5p: 459e12 /
#     (2 x 4 x 128 x 128 x 2)); Google publishes no v6e clock: 1.75 GHz is assumed (918e12 over 2 MXUs of
#     256 x 256 would need 3.5 GHz);
#   cores: TensorCores a device drives (megacore v4 / v5p: 2, a kernel's parallel grid axes split over them);
#   eup_per_clock: exponentials per clock per core, one (8, 128) float32 vreg (libtpu's per-bundle capacity: one
#     EUP slot);
#   vmem_bytes: VMEM per core (jax's `pltpu.get_tpu_info`); default_vmem_limit_bytes: the scoped VMEM limit
#     XLA:TPU gives a kernel that sets none (libtpu's optimized HLO: 16 MiB, 32 MiB on v6e).
TPU_CORE = {
    "v4": {"clock_hz": 1.05e9, "cores": 2, "eup_per_clock": 1024, "vmem_bytes": 16 * MIB,
           "default_vmem_limit_bytes": 16 * MIB},
    "v5e": {"clock_hz": 1.5e9, "cores": 1, "eup_per_clock": 1024, "vmem_bytes": 128 * MIB,
            "default_vmem_limit_bytes": 16 * MIB},
    "v5p": {"clock_hz": 1.75e9, "cores": 2, "eup_per_clock": 1024, "vmem_bytes": 64 * MIB,
            "default_vmem_limit_bytes": 16 * MIB},
    "v6e": {"clock_hz": 1.75e9, "cores": 1, "eup_per_clock": 1024, "vmem_bytes": 128 * MIB,
            "default_vmem_limit_bytes": 32 * MIB},
}


def _tpu_topology(chips: int, dims: int) -> str:
    """A slice shape for `chips` chips as Cloud TPU lays them out: a host's 2x2 (x1) block first, then doubling
    the smallest axis, the last one on ties (v5e: 2x2, 2x4, 4x4, ...; v4 / v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4)."""
    shape = [1] * dims
    while math.prod(shape) < chips:
        if shape[0] * shape[1] < 4:
            shape[0 if shape[0] == shape[1] else 1] *= 2
        else:
            shape[min(range(dims), key=lambda a: (shape[a], -a))] *= 2
    return "x".join(map(str, shape))


def _tpu(generation, count):
    hbm_gib, bandwidth, flops, megacore, dims = TPU_SPECS[generation]
    chips = count // 2 if megacore else count
    return Target(f"{generation}-{count}", "tpu", chips, hbm_gib * GIB, bandwidth, flops,
                  f"{generation}:{_tpu_topology(chips, dims)}", "megacore" if megacore else "default")


def _gpu(gpu, count):
    _, _, memory, bandwidth, flops = GPU_SPECS[gpu]
    hosts, per_host = (count // 8, 8) if count >= 8 else (1, count)
    return Target(f"{gpu}x{count}", "cuda", count, memory, bandwidth, flops, f"1x{hosts}x{per_host}", gpu=gpu)


# The targets the README's table and the tests use; `get_target` takes any other slice or node of these kinds.
TARGETS = {t.name: t for t in (
    _tpu("v4", 8), _tpu("v5e", 4), _tpu("v5e", 16), _tpu("v5e", 256), _tpu("v5p", 32), _tpu("v6e", 16),
    _gpu("h100", 8), _gpu("h200", 8), _gpu("h100", 16),
)}


def get_target(name: str) -> Target:
    """`v5e-16`, `v4-32`, `h100x8`, ...: a TPU slice by its Cloud TPU name (a power of two: chips for v5e / v6e,
    TensorCores for v4 / v5p), or a GPU node of 1, 2, 4 or 8 GPUs, or several hosts of 8."""
    tpu = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
    gpu = re.fullmatch(r"(h100|h200)x(\d+)", name)
    count = int((tpu or gpu).group(2)) if (tpu or gpu) else 0
    if tpu and count & (count - 1) == 0 and count >= (2 if TPU_SPECS[tpu.group(1)][3] else 1):
        return _tpu(tpu.group(1), count)
    if gpu and (count in (1, 2, 4) or (count >= 8 and count % 8 == 0)):
        return _gpu(gpu.group(1), count)
    from alignmamba_jax.errors import UserError
    raise UserError(f"--target={name!r}: expected a TPU slice (v4-N, v5e-N, v5p-N, v6e-N with N a power of two) or "
                    f"a GPU node (h100xN, h200xN with N 1, 2, 4 or a multiple of 8), e.g. {', '.join(TARGETS)}")


def accelerator_present() -> bool:
    """Whether this machine has a TPU or a GPU, from the operating system alone (no jax import): a PCI device of
    Google's vendor id or a TPU device file, NVIDIA's or AMD's GPU device files. The project's one probe."""
    import glob

    def vendor(device):
        try:
            with open(os.path.join(device, "vendor")) as f:
                return f.read().strip()
        except OSError:
            return None

    tpu = any(vendor(d) == "0x1ae0" for d in glob.glob("/sys/bus/pci/devices/*")) or \
        bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio/0")
    return tpu or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")


def prepare_compile_host() -> None:
    """Environment for compiling for targets this machine lacks; call before jax is imported. It changes
    nothing on a machine with an accelerator, or where the variables are already set."""
    if not accelerator_present():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # no TPU here for libtpu's lockfile to guard
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def installed(module: str) -> bool:
    """Whether `module` (dotted) can be imported, without importing it; False, not ModuleNotFoundError, when a
    parent package is absent (`find_spec("jax_plugins.xla_cuda13")` raises without `jax_plugins`)."""
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def missing_toolchain(platform: str) -> Optional[str]:
    """Why this machine cannot compile for `platform` ("tpu" / "cuda"), or None if it can."""
    if platform == "tpu":
        if not installed("libtpu"):
            return 'libtpu is not installed (pip install -e ".[aot]")'
        return None
    if not installed("jax_plugins.xla_cuda13") and not installed("jax_plugins.xla_cuda12"):
        return 'the CUDA plugin is not installed (pip install -e ".[aot]")'
    if ptxas_path() is None:
        return 'ptxas is not installed (pip install -e ".[aot]" brings nvidia-cuda-nvcc)'
    return None


def ptxas_path() -> Optional[str]:
    import shutil
    try:
        import nvidia.cu13  # noqa: F401  (nvidia-cuda-nvcc for CUDA 13 installs bin/ptxas here)
        candidate = os.path.join(list(nvidia.cu13.__path__)[0], "bin", "ptxas")
        if os.path.exists(candidate):
            return candidate
    except ImportError:
        pass
    return shutil.which("ptxas")


@contextlib.contextmanager
def _stderr_only_on_failure():
    """Holds back what native code writes to file descriptor 2 in the block; lets it through if the block
    raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def target_devices(target: Target) -> list:
    """The target's compile-only devices (importing jax: call `prepare_compile_host` first)."""
    from jax.experimental import topologies
    from alignmamba_jax.errors import UserError
    reason = missing_toolchain(target.platform)
    if reason:
        raise UserError(f"cannot compile for {target.name}: {reason}")
    if target.platform == "tpu":
        # a host holds a 2x2(x1) block of chips, or the whole slice where it is smaller
        dims = [int(x) for x in target.topology.split(":")[1].split("x")] + [1]
        bounds = (min(dims[0], 2), min(dims[1], 2), 1)
        with _stderr_only_on_failure():   # libtpu looks for a TPU VM's metadata and says at length it is none
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
                chips_per_host_bounds=bounds, num_slices=1)
    else:
        topology = topologies.get_topology_desc(platform="cuda", topology_name="", topology=target.topology,
                                                target_config=gpu_target_config(target.gpu))
    devices = list(topology.devices)
    if len(devices) != target.chips:
        raise UserError(f"{target.name}: expected {target.chips} devices, libtpu/XLA gave {len(devices)}")
    return devices
