"""The GPU suite (benchmarks/device_suite.py) without a GPU: its arguments, its plan against the device's limits,
the wheels `make wheels` fetches, the imports that must stay light, the roofline and sweep arithmetic of
scan_bench.py, and (slow) the whole suite as a CPU dry run, so that it works the first time it meets a GPU."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

import device_suite
import scan_bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")

# Distributions the GPU image has (the device machine's package list, 2026-11), as far as this project uses them.
GPU_IMAGE = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "absl-py", "numpy", "matplotlib", "tqdm",
             "psutil", "etils", "pyyaml", "protobuf", "packaging", "pytest", "hypothesis", "pytest-timeout"}
DATA_LOADERS_ONLY = {"tensorflow-datasets", "grain", "array-record"}   # imported only by the TFDS / grain paths


def normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def install_requires():
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requirements = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))
    return {normalized(re.split(r"[<>=!~\[ ]", r)[0]) for r in requirements}


def test_suite_script_parses_its_arguments():
    ok = subprocess.run(["bash", os.path.join(BENCH, "device_suite.sh"), "--help"], capture_output=True, text=True,
                        env=dict(os.environ, PYTHON=sys.executable))
    assert ok.returncode == 0 and "--dry_run" in ok.stdout and "--budget_s" in ok.stdout
    bad = subprocess.run(["bash", os.path.join(BENCH, "device_suite.sh"), "--steps", "scan_bench", "nonsense"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert bad.returncode == 1 and "error: --steps: unknown ['nonsense']" in bad.stderr
    args = device_suite.parse_args(["--dry_run", "--steps", "demo", "--out", "/tmp/x"])
    assert args.dry_run and args.steps == ["demo"] and args.budget_s == 1500 and args.python == sys.executable


def test_gpu_plan_fits_the_device_and_runs_the_issue_sizes():
    args = device_suite.parse_args([])
    steps = device_suite.plan(args, "py", "/out", "/work")
    assert device_suite.install_budget(args) + sum(s.budget_s for s in steps) <= device_suite.BUDGET_S == 360
    outputs = {s.output for s in steps} | {"suite.json", "suite.log"}
    assert len(outputs) <= 8                                    # what the device tool brings back
    argv = {s.name: " ".join(s.argv) for s in steps}
    assert "--device gpu --batch 8 --lengths 2048 --channels 2048 --state 16 --dtype bfloat16" in argv["scan_bench"]
    assert "--sweep" in argv["scan_sweep"] and "--json /out/scan_sweep.json" in argv["scan_sweep"]
    assert "--lengths 2176 4352" in argv["efficiency"] and "-m gpu" in argv["gpu_tests"]
    assert "--config.train.steps=100" in argv["demo"] and "configs/synthetic.py" in argv["demo"]
    assert all(dict(s.env)["JAX_PLATFORMS"] == "cuda,cpu" for s in steps)
    assert "ALIGNMAMBA_DRY_RUN" not in dict(next(s for s in steps if s.name == "gpu_tests").env)


def test_a_hanging_step_is_killed_with_its_children_and_the_suite_goes_on(tmp_path):
    log = device_suite.Log(tmp_path / "suite.log")
    pid_file = tmp_path / "child.pid"
    hang = (f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(600)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
            f"time.sleep(600)")
    deadline = device_suite.time.perf_counter() + 60
    record = device_suite.run_timed("hang", 5.5, lambda t: (device_suite.run_process([sys.executable, "-c", hang], t,
                                                                                   log)[0], ""), deadline, log)
    assert record["status"] == "timeout" and record["seconds"] < 15
    child = int(pid_file.read_text())
    for _ in range(50):                                          # the grandchild went with its process group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        device_suite.time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the step's child process outlived the step's timeout")
    crash = device_suite.run_timed("crash", 30, lambda t: 1 / 0, deadline, log)
    assert crash["status"] == "failed" and "ZeroDivisionError" in crash["note"]
    late = device_suite.run_timed("late", 30, lambda t: (0, ""), device_suite.time.perf_counter() + 2, log)
    assert late["status"] == "skipped"
    assert "started" in (tmp_path / "suite.log").read_text()


def test_make_wheels_lists_the_packages_the_gpu_image_lacks():
    out = subprocess.run(["make", "-n", "wheels"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    pinned = {normalized(n) for n in re.findall(r"([A-Za-z0-9_.\-]+)==\d", out)}
    assert pinned == install_requires() - GPU_IMAGE - DATA_LOADERS_ONLY == {"ml-collections", "tensorboardx"}
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "--implementation cp",
                 "--platform manylinux_2_17_x86_64", "--dest .whl"):
        assert flag in out


def test_library_models_training_and_benchmarks_do_not_import_tfds_or_grain(tmp_path):
    code = f"""
import sys
import alignmamba_jax, alignmamba_jax.kernels, alignmamba_jax.models, alignmamba_jax.train, alignmamba_jax.main
import efficiency, scan_bench, train_throughput, device_suite
from alignmamba_jax import data, train
config = train.default_config().data
config.synthetic.update(n_train=4, n_valid=2, n_test=2)
assert data.load_splits(config)["train"]["text"].shape[0] == 4
print(sorted(m for m in sys.modules if m.partition(".")[0] in {device_suite.ABSENT!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=BENCH))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_roofline_of_the_goal_shape_on_an_h200():
    traffic = scan_bench.scan_traffic(8, 2048, 2048, 16, itemsize=2)
    elements = 8 * 2048 * 2048
    assert traffic["forward"] == (3 * 2 * elements + 2 * 2 * 8 * 2048 * 16 + 4 * 2048 * 16, elements * 16)
    exps_per_s = 16 * 132 * 1.98e9
    floor = scan_bench.roofline(250e-6, traffic["forward"], 4.8e12, exps_per_s)
    assert floor["bound"] == "exp"                              # 128 us of exps against 42 us of HBM traffic
    assert floor["floor_s"] == pytest.approx(elements * 16 / exps_per_s)
    assert floor["fraction_of_floor"] == pytest.approx(floor["floor_s"] / 250e-6)
    fwd_bwd = scan_bench.roofline(1e-3, traffic["forward_backward"], 4.8e12, exps_per_s)
    assert fwd_bwd["floor_s"] == pytest.approx(2 * floor["floor_s"])


def test_sweep_candidates_order_and_best():
    defaults = {"chunk": 64, "block_c": 64, "num_warps": 4, "unroll": 1}
    candidates = scan_bench.sweep_candidates(defaults)
    assert candidates[0] == defaults and len(candidates) == 1 + 2 + 2 + 2 + 1      # unroll 1 cannot halve
    assert {"chunk": 32, "block_c": 64, "num_warps": 4, "unroll": 1} in candidates
    assert all(sum(c[k] != defaults[k] for k in defaults) == 1 for c in candidates[1:])
    order = scan_bench.sweep_order({"a": [1, 2, 3], "b": [4]})
    assert order == [("a", 1), ("b", 4), ("a", 2), ("a", 3)]
    rows = [{"backend": "a", "settings": {"x": 1}, "forward_s": 2.0, "forward_backward_s": 5.0},
            {"backend": "a", "settings": {"x": 2}, "forward_s": 3.0, "forward_backward_s": 4.0},
            {"backend": "a", "settings": {"x": 3}, "error": "failed"}]
    best = scan_bench.best_settings(rows)["a"]
    assert best["forward_s"]["settings"] == {"x": 1} and best["forward_backward_s"]["settings"] == {"x": 2}


def test_efficiency_compares_alignmamba_with_both_attention_implementations():
    import efficiency
    row = lambda model, time_ms, memory: dict(model=model, text_len=2176, tokens=6528, time_ms=time_ms,  # noqa: E731
                                               memory_bytes=memory, flops=100)
    lines = efficiency.summarize([row("alignmamba", 10.0, 50), row("transformer_single", 100.0, 100),
                                  row("transformer_single+cudnn", 20.0, 80)])
    assert any(line.startswith("vs transformer_single at L=2176") and "time -90.0% (paper -83.3%)" in line
               for line in lines)
    assert any(line.startswith("vs transformer_single+cudnn at L=2176") and "memory -37.5% (paper -20.3%), "
               "time -50.0%" in line for line in lines)


@pytest.mark.slow
def test_dry_run_of_the_whole_suite(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(BENCH, "device_suite.sh"), "--dry_run", "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert sorted(os.listdir(out)) == sorted(["suite.json", "suite.log", "pytest_gpu.json", "scan_bench.json",
                                              "scan_sweep.json", "efficiency.json", "train_throughput.json",
                                              "demo_results.json"])
    load = lambda name: json.load(open(out / name))  # noqa: E731
    suite = load("suite.json")
    assert [s["status"] for s in suite["steps"]] == ["ok"] * 8
    assert all(v == "ok" for v in suite["environment"]["imports"].values())
    assert suite["environment"]["absent_but_imported"] == []
    assert f"{out}/scan_bench.json" in proc.stdout                     # it says where each result went

    tests = load("pytest_gpu.json")["tests"]
    kernel_tests = [k for k in tests if "test_gpu_kernel_matches_reference[" in k and k.endswith("-pallas_triton]")]
    assert len(kernel_tests) == 2 and all(tests[k]["outcome"] == "passed" for k in kernel_tests)
    assert tests["tests/test_gpu.py::test_alignmamba_forward_on_gpu_matches_cpu"]["outcome"] == "passed"

    scan = load("scan_bench.json")
    timed = {r["backend"] for r in scan["results"] if "forward_backward_s" in r}
    assert {"reference", "associative", "chunked", "pallas_triton"} <= timed
    assert "pallas_triton" in load("scan_sweep.json")["best"]

    models = {r["model"] for r in load("efficiency.json")["rows"]}
    assert models == {"alignmamba", "transformer_single", "transformer_multi"}    # no cuDNN on a CPU
    throughput = load("train_throughput.json")
    assert {r["model"] for r in throughput["rows"]} == {"alignmamba", "transformer_single"}
    assert "cuDNN" in throughput["skipped"]["transformer_single+cudnn"]
    assert "Corr" in load("demo_results.json")["test"]
