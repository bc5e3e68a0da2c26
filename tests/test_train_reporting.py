"""Reporting: the paper's Table 1 layout, multi-seed aggregation, metrics.jsonl resume truncation."""
import json

import numpy as np
import pytest

from alignmamba_jax import reporting


def test_missing_table_has_rates_average_and_drop():
    rates = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
    accs = [0.80, 0.78, 0.75, 0.71, 0.66, 0.60, 0.52]
    sweep = {"random_tokens": {r: {"Non0_acc_2": a, "MAE": 1.0} for r, a in zip(rates, accs)}}
    out = reporting.missing_table(sweep, ["Non0_acc_2"])
    row = out["table"]["random_tokens"]["Non0_acc_2"]
    assert [row[r] for r in rates] == accs
    assert row["average"] == pytest.approx(sum(accs) / 7)
    assert row["drop"] == pytest.approx(0.80 - 0.52)
    header = out["markdown"].splitlines()[0]
    assert header == "| protocol | metric | " + " | ".join(rates) + " | average | drop |"
    assert "MAE" not in out["markdown"]


def test_aggregate_runs_reports_mean_and_sample_std(tmp_path):
    values = [0.70, 0.74, 0.75]
    dirs = []
    for i, v in enumerate(values):
        d = tmp_path / f"seed{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"test": {"Non0_acc_2": v}, "valid": {"Non0_acc_2": v / 2}}))
        dirs.append(str(d))
    summary = reporting.aggregate_runs(dirs)
    assert summary["test"]["Non0_acc_2"]["mean"] == pytest.approx(np.mean(values))
    assert summary["test"]["Non0_acc_2"]["std"] == pytest.approx(np.std(values, ddof=1))
    assert "± " in reporting.aggregate_table(summary)
    with pytest.raises(ValueError, match="results.json does not exist"):
        reporting.aggregate_runs([str(tmp_path / "nope")])


def test_metric_writer_truncates_records_after_the_resumed_step(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path), active=True)
    for step in (10, 20, 30):
        writer.write(step, {"train/loss": step / 10})
    writer.close()
    resumed = reporting.MetricWriter(str(tmp_path), active=True)
    resumed.truncate_after(20)
    resumed.write(30, {"train/loss": 9.0})
    resumed.close()
    assert reporting.read_metrics(str(tmp_path)) == [
        {"step": 10, "train/loss": 1.0}, {"step": 20, "train/loss": 2.0}, {"step": 30, "train/loss": 9.0}]
    assert reporting.plot_curves(str(tmp_path)).endswith("curves.png")
