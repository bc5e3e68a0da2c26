"""Ablation (the paper's Table 3): test metrics of AlignMamba and its ablated variants over seeds, synthetic data.

Rows (model overrides from `alignmamba_jax.config.MODEL_VARIANTS`):
  full            OT local alignment + MMD global alignment + time-major interleave (as configured: on the
                  synthetic default, the OT cost is learned with the temporal contrastive loss)
  full, paper OT rule   the same with every alignment option of ours off (variant paper_ot)
  w/o local       sources segment-mean resampled to the language length instead of OT
  w/o global      no MMD term
  single-stream   all tokens concatenated, one Mamba stack, no OT
  multi-stream    one Mamba stack per modality, pooled features fused, no OT
  w/o audio / w/o video / w/o language   the modality removed
Each row reports the test metrics of its best-validation checkpoint, mean ± std (ddof=1) over seeds, as a
Markdown table, a JSON file (per-seed values included) and a bar plot.

    python benchmarks/ablation.py --seeds 0 1 2 --json benchmarks/results/ablation.json \
        --markdown benchmarks/results/ablation.md --plot benchmarks/figures/ablation.png
"""
import os
import sys

import common
import study

ROWS = (  # (label, variant of configs/synthetic.py)
    ("full", "full"),
    ("full, paper OT rule", "paper_ot"),
    ("w/o local", "wo_local"),
    ("w/o global", "wo_global"),
    ("single-stream Mamba", "single_stream"),
    ("multi-stream Mamba", "multi_stream"),
    ("w/o audio", "wo_audio"),
    ("w/o video", "wo_video"),
    ("w/o language", "wo_language"),
)
ALIGNMENT_ROWS = ("w/o local", "w/o global", "single-stream Mamba", "multi-stream Mamba")
HIGHER_IS_BETTER = {"Non0_acc_2": True, "Non0_F1_score": True, "MAE": False, "Corr": True}
PAPER_MOSI_ACC2 = {"full": 86.9, "w/o local": 84.6, "w/o global": 85.8, "single-stream Mamba": 82.3,
                   "multi-stream Mamba": 83.7}


def summarize(per_seed, metrics):
    """{label: {seed: test metrics}} -> {label: {metric: (mean, std)}}."""
    return {label: {m: study.mean_std([r[m] for r in runs.values()]) for m in metrics}
            for label, runs in per_seed.items() if runs}


def markdown(summary, metrics, seeds, per_seed):
    head = ("| row | seeds | " + " | ".join(metrics) + " | paper MOSI Acc-2 |\n|---|---|"
            + "---|" * (len(metrics) + 1) + "\n")
    lines = []
    for label, stats in summary.items():
        cells = [study.fmt(*stats[m], digits=4 if m in ("MAE", "Corr") else 3) for m in metrics]
        paper = PAPER_MOSI_ACC2.get(label)
        lines.append(f"| {label} | {len(per_seed[label])} | " + " | ".join(cells) + f" | {paper if paper else ''} |")
    return head + "\n".join(lines) + (f"\n\nmean ± std (ddof=1) over the finished runs of seeds {list(seeds)} "
                                      "(test split, best-validation checkpoint)\n")


def full_vs_alignment(summary, metrics):
    """For each alignment ablation and metric: does the full model's mean beat it?"""
    if "full" not in summary:
        return {}
    out = {}
    for label in ALIGNMENT_ROWS:
        if label not in summary:
            continue
        out[label] = {}
        for m in metrics:
            full, other = summary["full"][m][0], summary[label][m][0]
            out[label][m] = bool(full > other if HIGHER_IS_BETTER.get(m, True) else full < other)
    return out


def main(argv=None):
    p = common.parser(__doc__)
    study.add_common_args(p, default_root=os.path.join(study.REPO, "runs", "bench", "synthetic"))
    p.add_argument("--config", default="configs/synthetic.py")
    p.add_argument("--rows", nargs="+", default=[label for label, _ in ROWS],
                   help="subset of row labels, e.g. 'full' 'w/o local'")
    p.add_argument("--metrics", nargs="+", default=list(study.DEFAULT_METRICS))
    common.add_json(p, required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    rows = [(label, variant) for label, variant in ROWS if label in args.rows]
    unknown = set(args.rows) - {label for label, _ in ROWS}
    if unknown:
        raise ValueError(f"--rows: unknown {sorted(unknown)}; expected labels from {[l for l, _ in ROWS]}")
    overrides = study.common_overrides(args)

    per_seed = {label: {} for label, _ in rows}
    for seed in args.seeds:  # seed-major: an interrupted study still has every row for the first seeds
        for label, variant in rows:
            print(f"[ablation] {label} seed {seed}", flush=True)
            config = study.make_config(args.config, variant, overrides, seed)
            workdir = os.path.join(args.workdir_root, f"{variant}_s{seed}")
            results = study.run(config, workdir, reuse_only=args.reuse_only)
            if results is None:
                continue
            per_seed[label][seed] = {m: float(results["test"][m]) for m in args.metrics}
            summary = summarize(per_seed, args.metrics)
            study.write_json(args.json, {
                "config": args.config, "overrides": overrides, "seeds": args.seeds,
                "per_seed": per_seed, "summary": summary,
                "full_beats": full_vs_alignment(summary, args.metrics)})

    summary = summarize(per_seed, args.metrics)
    study.write_json(args.json, {"config": args.config, "overrides": overrides, "seeds": args.seeds,
                                 "per_seed": per_seed, "summary": summary,
                                 "full_beats": full_vs_alignment(summary, args.metrics)})
    table = markdown(summary, args.metrics, args.seeds, per_seed)
    print(table)
    for label, wins in full_vs_alignment(summary, args.metrics).items():
        print(f"full vs {label}: " + ", ".join(f"{m} {'better' if w else 'NOT better'}" for m, w in wins.items()))
    if args.markdown:
        study.write_text(args.markdown, table)
    if args.plot:
        from plotting import plot_grouped_bars
        labels = list(summary)
        panels = [(m, labels, [summary[l][m][0] for l in labels], [summary[l][m][1] for l in labels])
                  for m in args.metrics]
        plot_grouped_bars(panels, args.plot, title="Ablation on the synthetic default (mean ± std over seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
