"""Tests of benchmarks/kernel_report.py: the Mosaic GPU kernels compile deviceless for an H100 (sm_90a) through
ptxas, and the report reads registers, spills, shared memory and the grid from what Mosaic GPU dumped; the TPU
kernels compile for a compile-only v5e chip, and the report reads bundles, grid steps, unit use and VMEM from
libtpu's dumps (skipped, with the reason, where the `aot` extra (the CUDA plugin, ptxas; libtpu) is missing);
how instructions per element are read from SASS; the table that puts the peer's rows
(benchmarks/kernel_report_peer.py) beside ours."""
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
    """Batch 4 x 2 channel blocks: 8 CTAs, no split (8 < 132 SMs, but an 8-step sequence is one chunk)."""
    report = _report(tmp_path, "4,8,128,16,bfloat16", "fwd")
    assert report["target"] == "h100" and [k["pass"] for k in report["kernels"]] == ["fwd"]
    kernel = report["kernels"][0]
    assert kernel["shape"] == [4, 8, 128, 16] and kernel["dtype"] == "bfloat16" and kernel["launches"] == 1
    _check(kernel, ctas=8)


@needs_cuda
@pytest.mark.slow
def test_kernel_report_backward_and_the_split_forward_for_h100(tmp_path):
    """Batch 1 x 2 blocks over 64 chunks of 8: the forward splits into 64 segments (at most one a chunk; 128
    CTAs, the forward launched twice); the split's backward launches the backward kernel once, after its light
    adjoint pass."""
    fwd, bwd = _report(tmp_path, "1,512,128,16,bfloat16", "fwd,bwd")["kernels"]
    _check(fwd, ctas=128)
    assert fwd["launches"] == 2
    _check(bwd, ctas=128)
    assert bwd["launches"] == 1 and bwd["segment_adjoints"]["launches"] == 1     # one full backward pass


def _sass(lines):
    return "\n".join(line if line.startswith(".L_x") else f"   -:-:-:Y:01        /*0000*/    {line} ;"
                     for line in lines)


def test_instruction_counts_read_unrolled_loops_loops_without_exponentials_and_the_per_chunk_work():
    """A chunk loop around two per-token loops of a thread holding 8 elements: one unrolled twice (16
    exponentials: 2 tokens an iteration), one without exponentials (1 token an iteration), plus once-per-chunk
    work (8 FADD for a chunk of 4 tokens); a barrier wait's spin loop (no arithmetic) is not a token loop."""
    from alignmamba_jax import compile_report
    code = _sass([".L_x_0:", "LDS R1, [R2]", ".L_x_1:"] + ["MUFU.EX2 R3, R4"] * 16 + ["FFMA R1, R2, R3, R4"] * 16
                 + ["BRA `(.L_x_1)", ".L_x_2:"] + ["FMUL R1, R2, R3"] * 24 + ["SHFL.BFLY PT, R1, R2, 0x10, 0x1f"] * 4
                 + ["BRA `(.L_x_2)"] + ["FADD R1, R1, R2"] * 8 + [".L_x_3:", "SYNCS.PHASECHK R1", "BRA `(.L_x_3)",
                                                                    "BRA `(.L_x_0)"])
    counts = compile_report.instruction_counts(code, "sass", 8, iterations_per_outer=4)
    assert counts["ex2"] == 1 and counts["ffma"] == 1 and counts["fmul"] == 3 and counts["shfl"] == 0.5
    assert counts["fadd"] == 8 / 4 / 8
    assert len(compile_report.inner_loops(code, "sass")) == 2


def test_side_by_side_table_orders_shapes_then_passes_ours_first_and_refuses_another_target():
    import kernel_report

    def row(backend, pass_name, shape, **extra):
        return {"backend": backend, "pass": pass_name, "shape": shape, "dtype": "bfloat16", "registers": 1,
                "spills": 0, "smem_bytes": 1, "ctas": 1, "ctas_per_sm": 1, "waves": 1,
                "instructions_per_element": {"ex2": 1, "ffma": 1, "fmul": 1, "fadd": 1},
                "bound_us": {"exp": 1, "fp32": 1, "hbm": 1}, "static_bound_us": 2.0, "floor_us": 1.0,
                "bound_over_floor": 2.0, "compile_s": 1, **extra}

    ours = {"target": "h100", "kernels": [row("pallas_mosaic_gpu", p, s) for s in ([8, 2, 2, 16], [1, 8, 2, 16])
                                          for p in ("fwd", "bwd")]}
    peer = {"target": "h100", "peer": "jla", "kernels": [
        row("jla", "bwd", [1, 8, 2, 16], segment_adjoints={"static_bound_us": 0.5}),
        row("jla", "fwd", [8, 2, 2, 16], softplus=True)]}
    merged = kernel_report.side_by_side(ours, [peer])
    assert [(k["backend"], k["pass"], k["shape"][0]) for k in merged["kernels"]] == [
        ("pallas_mosaic_gpu", "fwd", 8), ("jla", "fwd", 8), ("pallas_mosaic_gpu", "bwd", 8),
        ("pallas_mosaic_gpu", "fwd", 1), ("pallas_mosaic_gpu", "bwd", 1), ("jla", "bwd", 1)]
    text = kernel_report.table(merged)
    assert "| 2.0 (softplus) |" in text and "| 2.0 (+ split pre-pass 0.5 us) |" in text
    with pytest.raises(SystemExit, match="error: jla is for h200, this run for h100"):
        kernel_report.side_by_side(ours, [dict(peer, target="h200")])


def test_peer_report_without_the_peer_installed_says_where_to_run_it():
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_report_peer.py")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: jax-linear-attention is not installed in ") and ".venv-peer/bin/python" in result.stderr


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
