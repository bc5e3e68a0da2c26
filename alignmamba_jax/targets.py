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
import dataclasses
import os
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


def _tpu(name, chips, topology, hbm_gib, bandwidth, flops, chip_config="default"):
    return Target(name, "tpu", chips, hbm_gib * GIB, bandwidth, flops, topology, chip_config)


def _gpu(name, gpu, hosts):
    _, _, memory, bandwidth, flops = GPU_SPECS[gpu]
    return Target(name, "cuda", 8 * hosts, memory, bandwidth, flops, f"1x{hosts}x8", gpu=gpu)


TARGETS = {t.name: t for t in (
    _tpu("v4-8", 4, "v4:2x2x1", 32, 1.2e12, 275e12, "megacore"),
    _tpu("v5e-4", 4, "v5e:2x2", 16, 8.19e11, 197e12),
    _tpu("v5e-16", 16, "v5e:4x4", 16, 8.19e11, 197e12),
    _tpu("v5e-256", 256, "v5e:16x16", 16, 8.19e11, 197e12),
    _tpu("v5p-32", 16, "v5p:2x2x4", 95, 2.765e12, 459e12, "megacore"),
    _tpu("v6e-16", 16, "v6e:4x4", 32, 1.64e12, 918e12),
    _gpu("h100x8", "h100", 1),
    _gpu("h200x8", "h200", 1),
    _gpu("h100x16", "h100", 2),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        from alignmamba_jax.errors import UserError
        raise UserError(f"--target={name!r}: expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


def prepare_compile_host() -> None:
    """Environment for compiling for targets this machine lacks; call before jax is imported. It changes
    nothing on a machine with an accelerator, or where the variables are already set."""
    has_accelerator = any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0"))
    if not has_accelerator:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def missing_toolchain(platform: str) -> Optional[str]:
    """Why this machine cannot compile for `platform` ("tpu" / "cuda"), or None if it can."""
    import importlib.util
    if platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            return 'libtpu is not installed (pip install -e ".[aot]")'
        return None
    if importlib.util.find_spec("jax_plugins.xla_cuda13") is None and \
            importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
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


def target_devices(target: Target) -> list:
    """The target's compile-only devices (importing jax: call `prepare_compile_host` first)."""
    from jax.experimental import topologies
    from alignmamba_jax.errors import UserError
    reason = missing_toolchain(target.platform)
    if reason:
        raise UserError(f"cannot compile for {target.name}: {reason}")
    if target.platform == "tpu":
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    else:
        topology = topologies.get_topology_desc(platform="cuda", topology_name="", topology=target.topology,
                                                target_config=gpu_target_config(target.gpu))
    devices = list(topology.devices)
    if len(devices) != target.chips:
        raise UserError(f"{target.name}: expected {target.chips} devices, libtpu/XLA gave {len(devices)}")
    return devices
