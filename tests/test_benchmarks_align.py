"""benchmarks/align_memory.py and benchmarks/missing_anchor.py run end to end on tiny sizes (slow: `make
test-slow`) and write their schemas; align_memory's ott-jax rows only where ott-jax is installed (it is not a
dependency)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_DATA = ["data.synthetic.n_train=32", "data.synthetic.n_valid=16", "data.synthetic.n_test=16",
             "train.batch_size=8", "eval.batch_size=8", "model.n_layers=1", "train.steps=2"]

pytestmark = pytest.mark.slow


def run(*command):
    proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_align_memory_schema(tmp_path):
    out = tmp_path / "align_memory.json"
    with_ott = importlib.util.find_spec("ott") is not None
    args = ["--lengths", "12", "--repeats", "1", "--d_model", "16", "--n_layers", "1", "--json", str(out)]
    proc = run(os.path.join(REPO, "benchmarks", "align_memory.py"), *args, *(["--ott"] if with_ott else []))
    rows = json.loads(out.read_text())["rows"]
    expected = {("step", m) for m in ("alignmamba", "alignmamba_shipped", "alignmamba2")}
    if with_ott:
        expected |= {("step", "alignmamba2_ott"), ("sinkhorn", "sinkhorn_ours"), ("sinkhorn", "sinkhorn_ott")}
        assert "ott-jax / ours, step L=12: memory" in proc.stdout
    assert {(r["kind"], r["model"]) for r in rows} == expected
    for r in rows:
        assert r["text_len"] == 12 and r["memory_bytes"] > 0 and r["time_ms"] > 0
        assert r["tokens"] == (36 if r["kind"] == "step" else 24)


def test_missing_anchor_schema(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "missing_anchor.json"
    run("-m", "alignmamba_jax.main", "--config", "configs/synthetic.py", "--workdir", str(workdir),
        *[f"--config.{item}" for item in TINY_DATA])
    run(os.path.join(REPO, "benchmarks", "missing_anchor.py"), "--workdir", str(workdir), "--rates", "0.3", "0.6",
        "--json", str(out), "--set", *TINY_DATA)
    result = json.loads(out.read_text())
    assert result["best_step"] == 2 and sorted(result["by_rate"]) == ["0.3", "0.6"]
    for r in result["by_rate"].values():
        assert set(r["all"]) == {"Non0_acc_2", "Non0_F1_score", "MAE", "Corr"} and r["n_anchor_missing"] > 0
        assert r["prediction_std_anchor_missing"] >= 0
