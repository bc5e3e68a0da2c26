"""Tests of benchmarks/kernel_report.py: the Mosaic GPU kernels compile deviceless for an H100 (sm_90a) through
ptxas, and the report reads registers, spills, shared memory and the grid from what Mosaic GPU dumped; the TPU
kernels compile for a compile-only v5e chip, and the report reads bundles, grid steps, unit use and VMEM from
libtpu's dumps. Skipped, with the reason, where the `aot` extra (the CUDA plugin, ptxas; libtpu) is missing."""
import json
import os
import subprocess
import sys

import pytest

from alignmamba_jax import targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = targets.missing_toolchain("cuda")
needs_cuda = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile for an H100 here: {MISSING}")
MISSING_TPU = targets.missing_toolchain("tpu")
needs_tpu = pytest.mark.skipif(MISSING_TPU is not None, reason=f"cannot compile for a TPU here: {MISSING_TPU}")


def _report(tmp_path, shapes, passes, target="h100", *extra):
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_report.py"), "--target", target,
                    "--shapes", shapes, "--passes", passes, "--json", str(out), *extra], cwd=REPO, check=True,
                   timeout=900, env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    return json.loads(out.read_text())


def _check(kernel, ctas):
    assert kernel["registers"] > 0 and kernel["spills"] == 0
    assert 0 < kernel["smem_bytes"] <= 227 * 1024 and kernel["threads"] == 128
    assert kernel["ctas"] == ctas and kernel["ctas_per_sm"] >= 1
    assert kernel["instructions_per_element"]["ex2"] >= 1       # at least one exponential per element
    assert 0 < kernel["floor_us"] <= kernel["static_bound_us"]


@needs_cuda
def test_kernel_report_compiles_the_forward_for_h100(tmp_path):
    """Batch 4 x 2 channel blocks: 8 CTAs, no split (8 < 132 SMs, but a 16-step sequence is one chunk)."""
    report = _report(tmp_path, "4,16,128,16,bfloat16", "fwd")
    assert report["target"] == "h100" and [k["pass"] for k in report["kernels"]] == ["fwd"]
    kernel = report["kernels"][0]
    assert kernel["shape"] == [4, 16, 128, 16] and kernel["dtype"] == "bfloat16" and kernel["launches"] == 1
    _check(kernel, ctas=8)


@needs_cuda
@pytest.mark.slow
def test_kernel_report_backward_and_the_split_forward_for_h100(tmp_path):
    """Batch 1 x 2 blocks over 64 chunks: the forward splits into 64 segments (at most one a chunk; 128 CTAs,
    each kernel launched twice)."""
    fwd, bwd = _report(tmp_path, "1,1024,128,16,bfloat16", "fwd,bwd")["kernels"]
    _check(fwd, ctas=128)
    assert fwd["launches"] == 2
    _check(bwd, ctas=128)


TPU_KEYS = {"backend", "pass", "shape", "dtype", "spills", "static_bound_us", "floor_us", "bound_over_floor",
            "compile_s", "bundles_per_grid_step", "grid_steps", "unit_busy_pct", "scoped_vmem_bytes",
            "vmem_limit_bytes", "code_bytes", "program_bound_us"}


def _check_tpu_kernel(kernel):
    assert TPU_KEYS <= set(kernel), kernel
    assert kernel["bundles_per_grid_step"] > 0 and kernel["grid_steps"] >= 1
    assert kernel["spills"] >= 0 and kernel["code_bytes"] > 0
    assert 0 < kernel["scoped_vmem_bytes"] <= kernel["vmem_limit_bytes"]
    assert 0 < kernel["unit_busy_pct"]["EUP"] <= 100 and 0 < kernel["unit_busy_pct"]["VALU"] <= 100
    assert 0 < kernel["floor_us"] <= kernel["static_bound_us"] <= kernel["program_bound_us"]


@needs_tpu
def test_kernel_report_compiles_pallas_tpu_forward_and_backward_for_v5e(tmp_path):
    report = _report(tmp_path, "2,16,256,16,float32", "fwd,bwd", "v5e")
    assert report["target"] == "v5e"
    fwd, bwd = report["kernels"]
    assert (fwd["backend"], fwd["pass"], bwd["pass"]) == ("pallas_tpu", "fwd", "bwd")
    assert fwd["shape"] == [2, 16, 256, 16] and fwd["dtype"] == "float32"
    _check_tpu_kernel(fwd)
    _check_tpu_kernel(bwd)
    assert fwd["spills"] == 0


@needs_tpu
@pytest.mark.slow
def test_kernel_report_counts_the_xla_formulation_with_its_loop_trips(tmp_path):
    """chunked's forward is one XLA while loop over time: its program's bundles grow with the length (the trip
    count), though its code does not."""
    short, long = (_report(tmp_path, f"1,{length},256,16,float32", "fwd", "v5e", "--backends", "chunked")["kernels"][0]
                   for length in (64, 256))
    for row in (short, long):
        assert row["backend"] == "chunked" and row["grid_steps"] is None
        assert 0 < row["floor_us"] <= row["static_bound_us"] == row["program_bound_us"]
    assert long["static_bound_us"] > 3 * short["static_bound_us"]
