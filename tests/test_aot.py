"""Compiling the real training step for hardware this machine does not have (alignmamba_jax/aot.py, targets.py):
a 4-chip TPU v5e slice with `pallas_tpu` and an 8-GPU H100 node with `pallas_mosaic_gpu`, at small shapes.

Each compiles; every kernel operand holds the per-device batch, never the global one; the training step holds
no all-gather (pure data parallelism moves only gradients, by all-reduce) and the eval step moves at most its
replicated predictions; the Mosaic GPU kernels compile through
ptxas without spills; a batch larger than the device's memory is refused in one line. Skipped, with the reason,
where the `aot` extra (libtpu, the CUDA plugin, ptxas) is not installed; `make test` installs it.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from alignmamba_jax import aot, compile_report, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the synthetic default at a size that compiles in seconds: 12 text tokens, 24 audio and video frames, 1 layer
TINY = {"data.synthetic.text_len": 12, "data.synthetic.max_words": 8, "data.synthetic.min_words": 2,
        "data.synthetic.audio_len": 24, "data.synthetic.vision_len": 24, "data.synthetic.text_dim": 64,
        "model.d_model": 32, "model.n_layers": 1}


def _config(**overrides):
    spec = importlib.util.spec_from_file_location("synthetic_config", os.path.join(ROOT, "configs", "synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in {**TINY, **overrides}.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def _needs(platform):
    reason = targets.missing_toolchain(platform)
    return pytest.mark.skipif(reason is not None, reason=f"compiling for {platform}: {reason}")


def _check_per_device(report, per_device_batch):
    """Every kernel operand and result with a batch axis holds `per_device_batch` rows; none holds the global
    batch; no all-gather anywhere."""
    assert report["kernels"], "no Pallas kernel in the compiled step"
    for kernel in report["kernels"]:
        batched = [s for s in kernel["operands"] + kernel["results"] if s.count(",") >= 2]
        assert batched, kernel
        leading = {int(re.search(r"\[(\d+),", s).group(1)) for s in batched}
        assert leading == {per_device_batch}, kernel
    assert set(report["programs"]["train_step"]["collectives"]) <= {"all-reduce"}, report["collectives"]
    # the eval step returns its predictions replicated: at most a gather of those few bytes, no activations
    moved = sum(c["bytes"] for c in report["programs"]["eval_step"]["collectives"].values())
    assert moved <= 8 * report["eval_batch"], report["programs"]["eval_step"]["collectives"]
    assert report["per_device"]["fits"]


@_needs("tpu")
def test_training_step_compiles_for_a_4_chip_tpu_slice_with_per_device_pallas_tpu_kernels(tmp_path):
    report = aot.run(_config(**{"model.scan_backend": "pallas", "train.batch_size": 8, "eval.batch_size": 8}),
                     "v5e-4", json_path=str(tmp_path / "aot.json"), hlo_dir=str(tmp_path / "hlo"))
    assert report["platform"] == "tpu" and report["devices"] == 4 and report["global_batch"] == 8
    names = {k["name"] for k in report["kernels"]}
    assert {"selective_scan_fwd_tpu", "selective_scan_bwd_tpu"} <= names
    _check_per_device(report, 2)
    assert report["flops_per_device"] > 0 and report["per_device"]["peak_bytes"] > 0
    hlo = {p.name: p.read_text() for p in (tmp_path / "hlo").iterdir()}
    assert set(hlo) == {"train_step.txt", "eval_step.txt"} and "all-gather" not in hlo["train_step.txt"]
    assert (tmp_path / "aot.json").exists()


@_needs("cuda")
def test_training_step_compiles_for_8_h100s_with_per_device_mosaic_gpu_kernels_without_spills():
    report = aot.run(_config(**{"model.scan_backend": "pallas_mosaic_gpu", "train.batch_size": 16,
                                "eval.batch_size": 16}), "h100x8")
    assert report["platform"] == "cuda" and report["devices"] == 8
    assert all(k["target"].startswith("mosaic_gpu") for k in report["kernels"])
    _check_per_device(report, 2)
    compiled = report["gpu_kernels"]
    assert compiled and all(k["registers"] and k["registers"] > 0 for k in compiled), compiled
    assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in compiled), compiled


@pytest.mark.slow
@_needs("cuda")
def test_a_gpu_step_larger_than_the_memory_jax_may_use_is_refused_in_one_line():
    """XLA:GPU compiles any size: the check compares the program's peak with the share of HBM that JAX's
    allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION), here made tiny."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.0000001"}
    args = [f"--config.{k}={v}" for k, v in TINY.items()]
    out = subprocess.run([sys.executable, "-m", "alignmamba_jax.aot", "--config", "configs/synthetic.py",
                          "--target", "h100x8", "--config.model.scan_backend=chunked", "--config.train.batch_size=8",
                          "--config.eval.batch_size=8", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 1, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert re.match(r"error: does not fit: global batch 8 \(1 per device\) needs [\d.]+ GiB per device, h100x8 "
                    r"has [\d.]+ GiB; rerun with --max_batch", line), line


@_needs("tpu")
def test_a_tpu_batch_larger_than_hbm_is_refused_in_one_line_naming_both_sizes():
    config = _config(**{"model.scan_backend": "chunked", "train.batch_size": 4 * 2 ** 19, "eval.batch_size": 8})
    with pytest.raises(aot.UserError, match=r"does not fit: global batch 2097152 \(524288 per device\) needs "
                                            r"[\d.]+ GiB per device, v5e-4 has 15.75 GiB; rerun with --max_batch") as error:
        aot.run(config, "v5e-4")
    assert "\n" not in str(error.value)


def test_collectives_and_kernel_calls_are_read_from_optimized_hlo():
    hlo = """
  %p = f32[2,64,32]{2,1,0} parameter(0)
  %ar = f32[16,8]{1,0} all-reduce(f32[16,8]{1,0} %x), replica_groups={}
  %ag = bf16[8,128]{1,0} all-gather-start(bf16[2,128]{1,0} %y), dimensions={0}
  %k = (f32[2,64,32]{2,1,0}, f32[2,32,16]{2,1,0}) custom-call(%p, %p), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/selective_scan_fwd_tpu/pallas_call"}
"""
    assert compile_report.collectives(hlo) == {"all-reduce": {"count": 1, "bytes": 16 * 8 * 4},
                                    "all-gather": {"count": 1, "bytes": 8 * 128 * 2}}
    assert compile_report.kernel_calls(hlo) == [{"name": "selective_scan_fwd_tpu", "target": "tpu_custom_call",
                                      "operands": ["f32[2,64,32]", "f32[2,64,32]"],
                                      "results": ["f32[2,64,32]", "f32[2,32,16]"], "count": 1}]


def test_a_kernel_call_is_named_by_its_op_name_not_by_its_serialized_module():
    """A Mosaic GPU call as XLA:GPU prints it (shortened): its backend_config holds the kernel's MLIR, whose
    source locations name the Python function the kernel was traced in (`selective_scan_backend`)."""
    line = ('  %mpmd_map.64 = (f32[1,152,128]{2,1,0}, f32[1,128,16]{2,1,0}) custom-call(f32[1,152,128]{2,1,0} %a), '
            'custom_call_target="mosaic_gpu_v2", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(traced)/'
            'jvp(AlignMamba)/mamba/block_0/mixer/shard_map/jit(selective_scan_pallas_mosaic_gpu)/'
            'selective_scan_fwd_mosaic_gpu/mpmd_map" scheduling_name="mpmd_map.64"}, backend_config={module = '
            '"ML\\EFR selective_scan_backend common.py"}')
    assert [call["name"] for call in compile_report.kernel_calls(line)] == ["selective_scan_fwd_mosaic_gpu"]


@pytest.mark.parametrize("name,path,tfds_name,expected", [
    ("mmsa", "data/MOSEI/Processed/unaligned_50.pkl", "mosi", {"audio": (500, 74), "vision": (500, 35)}),
    ("mmsa", "/data/MOSI/Processed/aligned_50.pkl", "mosi", {"audio": (50, 5), "vision": (50, 20)}),
    ("mult", "/data/mosei_senti_data_noalign.pkl", "mosi", {"audio": (500, 74), "text": (50, 300)}),
    ("tfds", "/data/tfds", "mosei", {"audio": (500, 74), "vision": (500, 35)}),
])
def test_input_shapes_come_from_the_data_config_without_reading_data(name, path, tfds_name, expected):
    config = _config(**{"data.name": name, "data.path": path, "data.tfds_name": tfds_name})
    shapes = aot.input_shapes(config.data)
    assert {m: shapes[m] for m in expected} == expected and shapes["text"][0] == 50
    assert aot.input_shapes(_config().data) == {"text": (12, 64), "audio": (24, 5), "vision": (24, 20)}


def search(required, available, start, limit=2 ** 20):
    """largest_fitting over a probe that fits where required(n) <= available, and the n it probed."""
    probes = []

    def probe(n):
        probes.append(n)
        return required(n) <= available, required(n), available

    return aot.largest_fitting(probe, start, limit), probes


def brute_force(required, available, limit):
    return max([n for n in range(1, limit + 1) if required(n) <= available], default=0)


@pytest.mark.parametrize("start", [1, 5, 37, 38, 1000, 50_000])
@pytest.mark.parametrize("fixed,per_sample", [(3e8, 7.1e6), (1e9, 1.0), (0.0, 4e9), (2e9, 13e6)])
def test_the_largest_batch_that_fits_takes_a_few_probes_when_memory_is_linear(fixed, per_sample, start):
    available = 16e9
    limit = 10 ** 6
    largest, probes = search(lambda n: fixed + per_sample * n, available, start, limit)
    assert largest == min(limit, max(0, math.floor((available - fixed) / per_sample)))
    assert len(probes) <= 5, probes


@pytest.mark.parametrize("start", [1, 5, 37, 38, 1000])
@pytest.mark.parametrize("shape", ["steps", "convex", "concave", "flat_then_wall", "constant_bytes"])
def test_the_largest_batch_that_fits_is_exact_and_logarithmic_for_any_monotone_memory(shape, start):
    rng = np.random.default_rng(len(shape) * 1000 + start)
    limit = 4096
    cumulative = np.cumsum(rng.integers(0, 3, limit + 1) * 1e6)  # a staircase: buffer sizes jump
    required = {"steps": lambda n: 1e8 + cumulative[n],
                "convex": lambda n: 1e8 + 3e3 * n * n,
                "concave": lambda n: 1e8 + 5e7 * math.sqrt(n),
                "flat_then_wall": lambda n: 1e8 if n <= 777 else 1e12,
                "constant_bytes": lambda n: 1e8 if n <= 300 else 1e8 + 1,  # bytes tell nothing useful
                }[shape]
    for available in (1.5e8, 1e9, 1e8, 5e7):
        largest, probes = search(required, available, start, limit)
        assert largest == brute_force(required, available, limit), (available, probes)
        assert len(probes) <= 2 * (math.log2(limit) + 2), (available, probes)


def test_the_batch_search_compiles_the_training_step_reuses_the_known_compile_and_reports_each_probe(
        monkeypatch, capsys):
    compiled = []
    hbm = 16 * 2 ** 30

    def lower_programs(config, devices, shapes, train_batch, eval_batch):
        return {"train_step": train_batch // len(devices), "eval_step": None}

    def compile_program(per_device, target):  # 0.2 GiB of state, 5 MiB per example
        compiled.append(per_device)
        required = 0.2 * 2 ** 30 + 5 * 2 ** 20 * per_device
        if required > hbm:
            raise aot.DoesNotFit(required, hbm)
        return None, {"peak_bytes": required, "hbm_bytes": hbm}

    monkeypatch.setattr(aot, "lower_programs", lower_programs)
    monkeypatch.setattr(aot, "compile_program", compile_program)
    known = (True, 0.2 * 2 ** 30 + 5 * 2 ** 20 * 2, hbm)
    config = ml_collections.ConfigDict({"eval": {"batch_size": 16}})
    largest = aot.largest_batch_per_device(config, None, [None] * 16, None, 2, known)
    assert largest == math.floor((hbm - 0.2 * 2 ** 30) / (5 * 2 ** 20))
    assert 2 not in compiled and len(compiled) <= 4, compiled
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(compiled) and lines[-1].startswith(f"  batch {compiled[-1]} per device: "), lines


@_needs("tpu")
def test_aot_table_passes_every_override_and_keeps_a_row_that_fails(tmp_path):
    out = tmp_path / "table.json"
    done = subprocess.run([sys.executable, "benchmarks/aot_table.py", "--configs", "configs/synthetic.py",
                           "--targets", "v5e-4", "--set=--config.train.batch_size=6",
                           "--set=--config.eval.batch_size=10", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    with open(out) as f:
        (row,) = json.load(f)["rows"]
    assert row["error"] == "error: train.batch_size=6 and eval.batch_size=10 must divide by the 4 devices of v5e-4"
    assert "| synthetic.py | v5e-4 | |" in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("target,platform", [("v5e-16", "tpu"), ("v5p-32", "tpu"), ("h100x16", "cuda")])
def test_the_mosi_step_compiles_for_larger_topologies_with_per_device_kernels(target, platform):
    """The MOSI config (its real shapes, global batch 32 or 64) on a 16-chip v5e slice, a 16-chip v5p slice and
    two hosts of 8 H100s."""
    if targets.missing_toolchain(platform):
        pytest.skip(f"compiling for {platform}: {targets.missing_toolchain(platform)}")
    spec = importlib.util.spec_from_file_location("mosi_config", os.path.join(ROOT, "configs", "mosi.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.batch_size = config.eval.batch_size = 64 if target == "h100x16" else 32
    report = aot.run(config, target)
    assert report["devices"] == 16 and report["per_device"]["fits"]
    _check_per_device(report, report["global_batch"] // 16)
