"""Every benchmark script runs end to end on tiny sizes (slow: `make test-slow`), so none of them can rot.

Each script runs in a subprocess exactly as documented on the command line; the tests check the files it
writes (JSON schema, consistency of rows and summaries, PNGs), never timings.
"""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
TINY_DATA = ["data.synthetic.n_train=32", "data.synthetic.n_valid=16", "data.synthetic.n_test=16",
             "train.batch_size=8", "eval.batch_size=8", "model.n_layers=1"]
TINY = ["--steps", "2", "--seeds", "0", "--set", *TINY_DATA]

pytestmark = pytest.mark.slow


def run_script(name, *args, timeout=900):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, name), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_efficiency_schema_and_flops(tmp_path):
    out = tmp_path / "eff.json"
    run_script("efficiency.py", "--lengths", 8, 16, "--repeats", 1, "--warmup", 0, "--d_model", 16,
               "--n_layers", 1, "--json", out, "--plot_dir", tmp_path, "--doubling_lengths", 8, 16,
               "--doubling_json", tmp_path / "doubling.json")
    rows = json.load(open(out))["rows"]
    assert set(json.load(open(out))) == {"rows"}
    assert {(r["model"], r["text_len"]) for r in rows} == {
        (m, L) for m in ("alignmamba", "transformer_single", "transformer_multi") for L in (8, 16)}
    for r in rows:
        assert set(r) == {"model", "text_len", "tokens", "time_ms", "time_ms_repeats", "memory_bytes", "flops"}
        assert len(r["time_ms_repeats"]) == 1                             # --repeats 1
        assert r["tokens"] == 3 * r["text_len"]  # --av_lengths equal
        assert r["time_ms"] > 0 and r["memory_bytes"] > 0 and r["flops"] > 0
    by = {(r["model"], r["text_len"]): r for r in rows}
    for m in ("alignmamba", "transformer_single", "transformer_multi"):
        assert by[m, 16]["flops"] > by[m, 8]["flops"]
    drows = json.load(open(tmp_path / "doubling.json"))["rows"]
    assert {r["model"] for r in drows} == {"alignmamba", "mamba_fusion_only"}
    assert is_png(tmp_path / "efficiency_time.png") and is_png(tmp_path / "efficiency_memory.png")


def test_count_flops_matches_hand_counts():
    import jax
    import jax.numpy as jnp
    from efficiency import count_flops, dce

    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert count_flops(jax.make_jaxpr(lambda a, b: a @ b)(a, b).jaxpr)[0] == 2 * 3 * 4 * 5

    def looped(a):
        return jax.lax.scan(lambda c, _: (c * 2.0 + 1.0, None), a, None, length=7)[0]
    assert count_flops(jax.make_jaxpr(looped)(a).jaxpr)[0] == 7 * 2 * 12  # body (mul, add) times trip count

    def with_dead(a, b):
        _unused = (a @ b).sum()
        return a + 1.0
    assert count_flops(dce(jax.make_jaxpr(with_dead)(a, b)))[0] == 12


def test_ablation_missing_am2_and_ot_plan(tmp_path):
    root = tmp_path / "runs"
    abl = tmp_path / "ablation.json"
    run_script("ablation.py", *TINY, "--rows", "full", "w/o local", "--workdir_root", root, "--json", abl,
               "--markdown", tmp_path / "ablation.md", "--plot", tmp_path / "ablation.png")
    report = json.load(open(abl))
    assert set(report["summary"]) == {"full", "w/o local"}
    for label, stats in report["summary"].items():
        for metric, (mean, std) in stats.items():
            assert mean == pytest.approx(report["per_seed"][label]["0"][metric]) and std == 0.0
    assert set(report["full_beats"]["w/o local"]) == {"Non0_acc_2", "Non0_F1_score", "MAE", "Corr"}
    assert is_png(tmp_path / "ablation.png") and "| full |" in open(tmp_path / "ablation.md").read()

    # the missing-modality study reuses the trained "full" run: only evaluates it again
    run_script("missing_modality.py", *TINY, "--protocols", "random_tokens", "--workdir_root", root,
               "--json", tmp_path / "missing.json", "--plot", tmp_path / "missing.png")
    report = json.load(open(tmp_path / "missing.json"))
    rows = report["summary"]["random_tokens"]["Non0_acc_2"]
    assert set(rows) == {"AlignMamba", "w/o alignment"}
    for row in rows.values():
        rates = [row[k][0] for k in ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7")]
        assert row["average"][0] == pytest.approx(sum(rates) / 7)
        assert row["drop 0.1->0.7"][0] == pytest.approx(rates[0] - rates[-1])
    assert is_png(tmp_path / "missing.png")

    run_script("alignmamba2_vs_1.py", *TINY, "--tasks", "sentiment", "--repeats", 1, "--warmup", 0,
               "--workdir_root", tmp_path / "am2", "--json", tmp_path / "am2.json")
    report = json.load(open(tmp_path / "am2.json"))
    cost = report["inference"]["sentiment"]["models"]
    # AlignMamba-2 at inference runs the same graph with or without its alignment regularisers
    assert cost["AlignMamba-2"]["flops"] == cost["AlignMamba-2, no align"]["flops"]
    assert cost["AlignMamba"]["flops"] > cost["AlignMamba, no OT"]["flops"]  # OT runs at inference
    assert set(report["accuracy"]["sentiment"]) == {"AlignMamba", "AlignMamba-2"}

    run_script("ot_plan.py", "--workdir", root / "full_s0", "--steps", 2, "--set", *TINY_DATA,
               "--n_samples", 8, "--png", tmp_path / "ot.png", "--json", tmp_path / "ot.json")
    acc = json.load(open(tmp_path / "ot.json"))["accuracy"]
    for m in ("audio", "vision"):
        assert all(0.0 <= v <= 1.0 for v in acc[m].values())
    assert is_png(tmp_path / "ot.png")


def test_scan_bench_runs(tmp_path):
    out = tmp_path / "scan.json"
    run_script("scan_bench.py", "--lengths", 16, 32, "--channels", 8, "--repeats", 1, "--json", out)
    assert json.load(open(out))["results"]


def test_scan_bench_sweeps_the_gpu_kernels_in_interpret_mode(tmp_path):
    """(A failing backend row and its exit status: tests/test_tool_errors.py.)"""
    out = tmp_path / "scan.json"
    run_script("scan_bench.py", "--lengths", "16", "--channels", 8, "--state", 4, "--repeats", 1, "--kernels_for",
               "gpu", "--sweep", "--sweep_budget_s", 1, "--json", out)
    sweep = json.load(open(out))
    assert sweep["sweep"][0]["settings"] == {"chunk": 64, "block_c": 64, "num_warps": 4, "unroll": 1}
    assert sweep["skipped_for_budget"] and "pallas_triton" in sweep["best"]           # the budget stops it


@pytest.mark.skipif(not os.path.exists(os.path.join(BENCH, "train_throughput.py")), reason="not present")
def test_train_throughput_runs(tmp_path):
    out = tmp_path / "tt.json"
    run_script("train_throughput.py", "--batch_size", 2, "--d_model", 16, "--n_layers", 1, "--repeats", 1,
               "--steps", 1, "--attention_impls", "xla", "cudnn", "--json", out)
    report = json.load(open(out))
    rows = report["rows"]
    assert [r["model"] for r in rows] == ["alignmamba", "transformer_single"]
    assert all(r["samples_per_s"] > 0 and not math.isnan(r["samples_per_s"]) for r in rows)
    assert list(report["skipped"]) == ["transformer_single+cudnn"]           # cuDNN needs a GPU: the others run


@pytest.mark.skipif(not os.path.exists(os.path.join(BENCH, "load_bench.py")), reason="not present")
def test_load_bench_runs(tmp_path):
    run_script("load_bench.py", "--workdir", tmp_path / "lb", "--train", 8, "--valid", 4, "--test", 4,
               "--modes", "pickle_load", "inmemory")
