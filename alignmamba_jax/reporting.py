"""What a run leaves behind: metrics.jsonl, TensorBoard events, results.json, tables and the curves PNG.

Paths go through `etils.epath`, so a workdir may be a bucket (gs://...) on a pod. Only process 0 writes; every other process gets a writer whose methods do nothing. `aggregate_runs` turns
several workdirs (one per seed) into mean/std tables; run it as
`python -m alignmamba_jax.reporting OUT_DIR WORKDIR [WORKDIR ...]`.
"""
import io
import json
import math
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
from absl import logging
from etils import epath

from alignmamba_jax.errors import UserError
from alignmamba_jax.workdir import write_atomic

MISSING_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


class MetricWriter:
    """Keeps metrics.jsonl (one JSON object per logged step) and mirrors scalars to TensorBoard.

    The file is rewritten rather than appended to, because object stores cannot append; each rewrite replaces
    the whole file at once (`write_atomic`), so a kill or a full disk never leaves half a line.
    """

    def __init__(self, workdir: str, active: bool):
        self.active = active
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.records = read_metrics(workdir) if active else []
        self._tb = None
        if active:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records logged after `step` (a resumed run re-logs them identically)."""
        if self.active:
            self.records = [r for r in self.records if r["step"] <= step]
            self._flush()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        self.records.append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
        self._flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def _flush(self) -> None:
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records), make_parent=False)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list:
    """The records of metrics.jsonl; a torn last line (written in place by an older version, then killed) is
    dropped with a warning, since the resumed run logs that step again."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not a JSON record ({error}); the file was edited or damaged: "
                                f"remove that line or the file to resume") from None
            logging.warning("%s: dropped its torn last line %r", path, line[:80])
    return records


def plot_curves(workdir: str, filename: str = "curves.png") -> Optional[str]:
    """Training loss, learning rate and validation metrics against step, one panel each."""
    records = read_metrics(workdir)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {
        "train loss": [k for k in ("train/loss", "train/task_loss", "train/align_loss")],
        "learning rate": ["train/learning_rate"],
        "validation": sorted({k for r in records for k in r if k.startswith("valid/")}),
    }
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6))
    for ax, (title, keys) in zip(axes, groups.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=key.split("/", 1)[1], marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = epath.Path(workdir) / filename
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    write_atomic(out, png.getvalue())
    return str(out)


def _fmt(value) -> str:
    if isinstance(value, (int, float, np.floating)):
        return f"{float(value):.4f}"
    return str(value)


def metrics_table(results: Mapping[str, Mapping[str, object]], splits: Sequence[str] = ("valid", "test")) -> str:
    """Markdown table: one row per metric, one column per split."""
    splits = [s for s in splits if s in results]
    keys = list(dict.fromkeys(k for s in splits for k in results[s]))
    lines = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(results[s].get(key, "")) for s in splits) + " |")
    return "\n".join(lines)


def missing_table(sweep: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str]) -> dict:
    """The paper's Table 1 layout from {protocol: {rate: {metric: value}}}.

    Returns {protocol: {metric: {"0.1": v, ..., "average": v, "drop": v(0.1) - v(0.7)}}} and a Markdown
    rendering under the key "markdown". Rates missing from the sweep are left out of the row.
    """
    table = {}
    for protocol, by_rate in sweep.items():
        rates = sorted(by_rate, key=float)
        table[protocol] = {}
        for metric in metrics:
            row = {r: float(by_rate[r][metric]) for r in rates}
            row["average"] = float(np.mean([row[r] for r in rates]))
            if "0.1" in row and "0.7" in row:
                row["drop"] = row["0.1"] - row["0.7"]
            table[protocol][metric] = row
    columns = list(dict.fromkeys(c for p in table.values() for row in p.values() for c in row))
    lines = ["| protocol | metric | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for protocol, rows in table.items():
        for metric, row in rows.items():
            lines.append(f"| {protocol} | {metric} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return {"table": table, "markdown": "\n".join(lines)}


def write_text(workdir: str, name: str, text: str) -> None:
    write_atomic(epath.Path(workdir) / name, text)


def write_results(workdir: str, results: Mapping[str, object]) -> None:
    write_text(workdir, "results.json", json.dumps(results, indent=2, sort_keys=True))


def aggregate_runs(workdirs: Sequence[str]) -> dict:
    """Mean and (sample) std over runs of every numeric metric in results.json, per split."""
    runs = []
    for workdir in workdirs:
        path = epath.Path(workdir) / "results.json"
        if not path.exists():
            raise UserError(f"{path} does not exist: is {workdir} a finished run?")
        try:
            runs.append(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a results file ({type(e).__name__}: {e})") from None
    summary = {"runs": list(workdirs)}
    for split in ("valid", "test"):
        keys = [k for k in runs[0].get(split, {}) if all(k in r.get(split, {}) for r in runs)]
        summary[split] = {}
        for key in keys:
            values = np.array([float(r[split][key]) for r in runs])
            summary[split][key] = {"mean": float(values.mean()),
                                   "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return summary


def aggregate_table(summary: Mapping[str, object]) -> str:
    splits = [s for s in ("valid", "test") if summary.get(s)]
    keys = list(dict.fromkeys(k for s in splits for k in summary[s]))
    lines = [f"{len(summary['runs'])} runs, mean ± std", "",
             "| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for key in keys:
        cells = [f"{summary[s][key]['mean']:.4f} ± {summary[s][key]['std']:.4f}" if key in summary[s] else ""
                 for s in splits]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) < 3:
        raise SystemExit("usage: python -m alignmamba_jax.reporting OUT_DIR WORKDIR [WORKDIR ...]")
    out_dir, workdirs = argv[1], argv[2:]
    try:
        summary = aggregate_runs(workdirs)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    table = aggregate_table(summary)
    write_text(out_dir, "seeds.json", json.dumps(summary, indent=2))
    write_text(out_dir, "seeds.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main(sys.argv)
