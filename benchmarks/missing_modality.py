"""Missing-modality robustness (the paper's Table 1 layout): test metrics as inputs are dropped, synthetic data.

AlignMamba (full) and its no-alignment ablation (no OT: segment-mean resampling to the language length, and no
MMD) are trained on complete data; their best-validation checkpoints are then evaluated on the test split with
`alignmamba_jax.data.missing.PROTOCOLS` applied at rates 0.1 ... 0.7 (the same masks for both models: the
protocol seed is fixed). The sweep is `train_and_evaluate`'s own (`eval.missing_rates`); a run already trained
by benchmarks/ablation.py with the same config is reused, only evaluated again.
Per protocol and metric: one row per model with each rate, the average over rates and the drop from 10% to 70%
missing, mean ± std over seeds; plus curves (rate 0 = complete test data) as a PNG.

    python benchmarks/missing_modality.py --seeds 0 1 2 --json benchmarks/results/missing_modality.json \
        --markdown benchmarks/results/missing_modality.md --plot benchmarks/figures/missing_modality.png
"""
import os
import sys

import numpy as np

import common
import study

RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MODELS = (  # (label, variant of configs/synthetic.py, extra overrides, workdir name)
    ("AlignMamba", "full", {}, "full"),
    ("w/o alignment", "full", {"model.use_local_alignment": False, "model.use_global_alignment": False},
     "no_alignment"),
)


def rate_key(rate):
    return f"{rate:g}"


def available_rates(runs, protocol):
    """Rates every run evaluated (a protocol may reject some, e.g. per_sample above (M - 1) / M)."""
    keys = [set(r["missing"]["by_rate"].get(protocol, {})) for r in runs.values()]
    return [x for x in RATES if all(rate_key(x) in k for k in keys)]


def summarize(per_seed, protocols, metrics):
    """{model: {seed: results}} -> {protocol: {metric: {model: {column: (mean, std)}}}}."""
    out = {}
    for protocol in protocols:
        out[protocol] = {}
        for metric in metrics:
            out[protocol][metric] = {}
            for model, runs in per_seed.items():
                if not runs:
                    continue
                rates = available_rates(runs, protocol)
                value = lambda r, x: r["missing"]["by_rate"][protocol][rate_key(x)][metric]  # noqa: E731
                cols = {"0": [r["test"][metric] for r in runs.values()]}
                for x in rates:
                    cols[rate_key(x)] = [value(r, x) for r in runs.values()]
                row = {c: study.mean_std(v) for c, v in cols.items()}
                if rates:
                    row["average"] = study.mean_std([np.mean([value(r, x) for x in rates]) for r in runs.values()])
                if 0.1 in rates and 0.7 in rates:
                    row["drop 0.1->0.7"] = study.mean_std([value(r, 0.1) - value(r, 0.7) for r in runs.values()])
                out[protocol][metric][model] = row
    return out


def markdown(summary, seeds, per_seed):
    blocks = []
    for protocol, by_metric in summary.items():
        for metric, by_model in by_metric.items():
            if not by_model:
                continue
            cols = list(next(iter(by_model.values())))
            digits = 4 if metric in ("MAE", "Corr") else 3
            lines = [f"**{protocol}, {metric}** (rate 0 = complete test data; seeds per model: "
                     + ", ".join(f"{k} {len(v)}" for k, v in per_seed.items()) + ")", "",
                     "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            for model, row in by_model.items():
                lines.append(f"| {model} | " + " | ".join(study.fmt(*row[c], digits=digits) for c in cols) + " |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + f"\n\nmean ± std over seeds {list(seeds)}\n"


def main(argv=None):
    p = common.parser(__doc__)
    study.add_common_args(p, default_root=os.path.join(study.REPO, "runs", "bench", "synthetic"))
    p.add_argument("--config", default="configs/synthetic.py")
    p.add_argument("--protocols", nargs="+", default=None,
                   help="names from alignmamba_jax.data.missing.PROTOCOLS (default: all)")
    p.add_argument("--metrics", nargs="+", default=["Non0_acc_2", "Non0_F1_score", "MAE"])
    common.add_json(p, required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    from alignmamba_jax.data import missing
    protocols = tuple(args.protocols or missing.PROTOCOLS)
    unknown = set(protocols) - set(missing.PROTOCOLS)
    if unknown:
        raise ValueError(f"--protocols: unknown {sorted(unknown)}; expected names from {sorted(missing.PROTOCOLS)}")
    base = study.common_overrides(args)
    base.update({"eval.missing_rates": RATES, "eval.missing_protocols": protocols,
                 "eval.missing_metrics": tuple(args.metrics)})

    per_seed = {label: {} for label, *_ in MODELS}
    for seed in args.seeds:
        for label, variant, extra, name in MODELS:
            print(f"[missing] {label} seed {seed}", flush=True)
            config = study.make_config(args.config, variant, {**base, **extra}, seed)
            results = study.run(config, os.path.join(args.workdir_root, f"{name}_s{seed}"),
                                reuse_only=args.reuse_only)
            if results is None:
                continue
            per_seed[label][seed] = {"test": results["test"], "missing": {"by_rate": results["missing"]["by_rate"]}}
            summary = summarize(per_seed, protocols, args.metrics)
            study.write_json(args.json, {"config": args.config, "overrides": base, "seeds": args.seeds,
                                         "rates": RATES, "protocols": protocols, "summary": summary,
                                         "per_seed": per_seed})
    summary = summarize(per_seed, protocols, args.metrics)
    table = markdown(summary, args.seeds, per_seed)
    print(table)
    if args.markdown:
        study.write_text(args.markdown, table)
    if args.plot:
        from plotting import plot_curve_panels
        metric = args.metrics[0]
        panels = []
        for protocol in protocols:
            curves = {}
            for model, row in summary[protocol][metric].items():
                xs = [0.0] + [x for x in RATES if rate_key(x) in row]
                curves[model] = (xs, [row[rate_key(x)][0] for x in xs],
                                 [row[rate_key(x)][1] for x in xs])
            panels.append((protocol, metric, curves))
        plot_curve_panels(panels, "missing rate", args.plot,
                          title="Missing-modality robustness, synthetic default (mean ± std over seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
