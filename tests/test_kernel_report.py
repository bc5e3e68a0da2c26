"""Tests of benchmarks/kernel_report.py: the Mosaic GPU kernels compile deviceless for an H100 (sm_90a) through
ptxas, and the report reads registers, spills, shared memory and the grid from what Mosaic GPU dumped. Skipped,
with the reason, where the `aot` extra (the CUDA plugin, ptxas) is missing."""
import json
import os
import subprocess
import sys

import pytest

from alignmamba_jax import targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = targets.missing_toolchain("cuda")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile for an H100 here: {MISSING}")


def _report(tmp_path, shapes, passes):
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_report.py"), "--target", "h100",
                    "--shapes", shapes, "--passes", passes, "--json", str(out)], cwd=REPO, check=True, timeout=900)
    return json.loads(out.read_text())


def _check(kernel, ctas):
    assert kernel["registers"] > 0 and kernel["spills"] == 0
    assert 0 < kernel["smem_bytes"] <= 227 * 1024 and kernel["threads"] == 128
    assert kernel["ctas"] == ctas and kernel["ctas_per_sm"] >= 1
    assert kernel["instructions_per_element"]["ex2"] >= 1       # at least one exponential per element
    assert 0 < kernel["floor_us"] <= kernel["static_bound_us"]


def test_kernel_report_compiles_the_forward_for_h100(tmp_path):
    """Batch 4 x 2 channel blocks: 8 CTAs, no split (8 < 132 SMs, but a 16-step sequence is one chunk)."""
    report = _report(tmp_path, "4,16,128,16,bfloat16", "fwd")
    assert report["target"] == "h100" and [k["pass"] for k in report["kernels"]] == ["fwd"]
    kernel = report["kernels"][0]
    assert kernel["shape"] == [4, 16, 128, 16] and kernel["dtype"] == "bfloat16" and kernel["launches"] == 1
    _check(kernel, ctas=8)


@pytest.mark.slow
def test_kernel_report_backward_and_the_split_forward_for_h100(tmp_path):
    """Batch 1 x 2 blocks over 64 chunks: the forward splits into 64 segments (at most one a chunk; 128 CTAs,
    each kernel launched twice)."""
    fwd, bwd = _report(tmp_path, "1,1024,128,16,bfloat16", "fwd,bwd")["kernels"]
    _check(fwd, ctas=128)
    assert fwd["launches"] == 2
    _check(bwd, ctas=128)
