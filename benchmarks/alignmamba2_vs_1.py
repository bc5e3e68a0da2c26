"""Accuracy, validation curves and inference cost of AlignMamba-2 and its ablations against AlignMamba.

The rows run on two synthetic tasks; inference cost is the cost of alignment at inference.

Accuracy: every row trained with several seeds on
  sentiment    the synthetic default (language / audio / vision regression, MOSI shapes)
  image_text   the synthetic two-modality classification task in the image-text feature layout
               (data.task="classification", modalities ("image", "text"), anchored on text; the local-alignment
               options reset to the paper's rule, since the synthetic config's temporal options mean nothing for
               patches)
and evaluated on test at their best-validation checkpoint (mean ± std over seeds). Rows (config file:variant):
  AlignMamba                      configs/synthetic.py (OT local alignment at inference, MMD)
  AlignMamba-2                    configs/alignmamba2_synthetic.py (shipped: resample + Sinkhorn + MMD of the
                                  resampled tokens)
  AlignMamba-2 w/o Sinkhorn       :wo_sinkhorn      AlignMamba-2 w/o MMD   :wo_mmd
  AlignMamba-2 w/o alignment      :wo_align (neither regulariser)
  AlignMamba-2, OT at inference   :ot_inference (ours, not the paper's: AlignMamba's learned-cost hard OT as the
                                  fusion front end, with the regularisers)
  AlignMamba-2, MMD on every frame :mmd_frames (MMD of every projected source frame, not the resampled tokens)
  AlignMamba-2, dense MLP for the MoE  :wo_moe (each layer's Modality-Aware MoE replaced by one GELU MLP of the
                                  same parameter count)
--plot draws each row's validation curve (the task's selection metric, mean ± std over seeds).

Inference cost: on one test-shaped batch of each task, the jitted inference forward (train=False) of
  AlignMamba              OT local alignment at inference (its fusion needs the aligned sequences)
  AlignMamba, no OT       the same network with segment-mean resampling instead of OT ("w/o local")
  AlignMamba-2            OT + MMD are training-only regularisers
  AlignMamba-2, no align  the same network trained without them
  AlignMamba-2, OT at inference (ours)
timed side by side (round-robin, median of repeats), with scan-aware FLOPs (efficiency.count_flops).
AlignMamba-2 shows no alignment cost at inference when its FLOPs equal those of its no-align twin (the
inference graphs are identical) and its time matches within noise; AlignMamba's OT shows as the gap to its
no-OT twin. Timing is independent of the parameter values, so freshly initialised parameters are used.

    python benchmarks/alignmamba2_vs_1.py --steps 600 --set train.eval_every=50 --seeds 0 1 2 \
        --json benchmarks/results/alignmamba2_vs_1.json --markdown benchmarks/results/alignmamba2_vs_1.md \
        --plot benchmarks/figures/alignmamba2_vs_1_curves.png
(600 steps: the small preset's 200 leave the OT-based rows still climbing.)
"""
import json
import os
import sys
import time

import numpy as np

import common
import study
from alignmamba_jax.config import MODEL_VARIANTS

PAPER_OT = {f"model.{k}": v for k, v in MODEL_VARIANTS["paper_ot"].items()}
TASKS = {
    "sentiment": {},
    # image patches have no time axis: the synthetic config's time-based OT options are reset to the paper rule
    "image_text": {"data.task": "classification", "data.modalities": ("image", "text"), "data.anchor": "text",
                   "data.num_classes": 3, "eval.select_mode": "max", **PAPER_OT},
}
TASK_METRICS = {"sentiment": ("Non0_acc_2", "Non0_F1_score", "MAE", "Corr"),
                "image_text": None}  # None: every metric classification_metrics returns
SELECT_METRIC_PREFERENCE = ("accuracy", "acc", "Acc", "top1_accuracy")
AM1, AM2 = "configs/synthetic.py", "configs/alignmamba2_synthetic.py"
MODELS = (  # (label, workdir name, config file, variant)
    ("AlignMamba", "full", AM1, "full"),
    ("AlignMamba-2", "am2", AM2, "full"),
    ("AlignMamba-2 w/o Sinkhorn", "am2_wo_sinkhorn", AM2, "wo_sinkhorn"),
    ("AlignMamba-2 w/o MMD", "am2_wo_mmd", AM2, "wo_mmd"),
    ("AlignMamba-2 w/o alignment", "am2_wo_align", AM2, "wo_align"),
    ("AlignMamba-2, OT at inference (ours)", "am2_ot_inference", AM2, "ot_inference"),
    ("AlignMamba-2, MMD on every frame", "am2_mmd_frames", AM2, "mmd_frames"),
    ("AlignMamba-2, dense MLP for the MoE", "am2_wo_moe", AM2, "wo_moe"),
)
COST_MODELS = (  # (label, config file, variant)
    ("AlignMamba", AM1, "full"),
    ("AlignMamba, no OT", AM1, "wo_local"),
    ("AlignMamba-2", AM2, "full"),
    ("AlignMamba-2, no align", AM2, "wo_align"),
    ("AlignMamba-2, OT at inference (ours)", AM2, "ot_inference"),
)


def classification_select_metric():
    """The accuracy key of classification_metrics (best checkpoint chosen on it, mode max)."""
    import numpy as np_
    from alignmamba_jax.metrics import classification_metrics
    keys = classification_metrics(np_.eye(3, dtype=np_.float32), np_.arange(3, dtype=np_.int32)).keys()
    for k in SELECT_METRIC_PREFERENCE:
        if k in keys:
            return k
    return next(k for k in keys if "acc" in k.lower())


def task_overrides(task):
    overrides = dict(TASKS[task])
    if task == "image_text":
        overrides["eval.select_metric"] = classification_select_metric()
    return overrides


def inference_cost(task_over, base, repeats, warmup, log=print):
    """Per COST_MODELS entry: median inference ms and FLOPs on one eval batch of the task's test split."""
    import jax
    from alignmamba_jax import data as data_lib
    from alignmamba_jax.train import create_model_for_data
    from efficiency import count_flops

    config = study.make_config(AM1, "full", {**base, **task_over}, 0)
    splits = data_lib.load_splits(config.data)
    modalities = tuple(config.data.modalities)
    n = min(config.eval.batch_size, len(splits["test"]["labels"]))
    feats = {m: jax.numpy.asarray(splits["test"][m][:n]) for m in modalities}
    masks = {m: jax.numpy.asarray(splits["test"][m + "_mask"][:n]) for m in modalities}
    runs, info = {}, {}
    for label, config_file, variant in COST_MODELS:
        cfg = study.make_config(config_file, variant, {**base, **task_over}, 0)
        model = create_model_for_data(cfg, splits)
        params = model.init(jax.random.PRNGKey(0), feats, masks, train=False)["params"]

        def forward(params, feats, masks, model=model):
            return model.apply({"params": params}, feats, masks, train=False)["prediction"]

        compiled = jax.jit(forward).lower(params, feats, masks).compile()
        flops, _ = count_flops(jax.make_jaxpr(forward)(params, feats, masks).jaxpr)
        runs[label] = (compiled, params)
        info[label] = {"flops": int(flops), "times": []}
        for _ in range(warmup):
            jax.block_until_ready(compiled(params, feats, masks))
    for _ in range(repeats):
        for label, (compiled, params) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, feats, masks))
            info[label]["times"].append(1e3 * (time.perf_counter() - t0))
    out = {label: {"time_ms": float(np.median(v["times"])), "time_min_ms": float(np.min(v["times"])),
                   "flops": v["flops"]} for label, v in info.items()}
    shapes = {m: list(feats[m].shape) for m in modalities}
    for label, v in out.items():
        log(f"  {label:24s} {v['time_ms']:9.2f} ms (min {v['time_min_ms']:.2f})  {v['flops']:.4e} flops  "
            f"inputs {shapes}")
    return {"batch_shapes": shapes, "models": out}


def cost_ratios(cost):
    m = cost["models"]
    return {
        "AlignMamba OT overhead (time)": m["AlignMamba"]["time_ms"] / m["AlignMamba, no OT"]["time_ms"] - 1,
        "AlignMamba OT overhead (flops)": m["AlignMamba"]["flops"] / m["AlignMamba, no OT"]["flops"] - 1,
        "AlignMamba-2 alignment overhead (time)": m["AlignMamba-2"]["time_ms"] / m["AlignMamba-2, no align"]["time_ms"] - 1,
        "AlignMamba-2 alignment overhead (flops)": m["AlignMamba-2"]["flops"] / m["AlignMamba-2, no align"]["flops"] - 1,
        "AlignMamba-2 / AlignMamba time": m["AlignMamba-2"]["time_ms"] / m["AlignMamba"]["time_ms"],
        "AlignMamba-2 OT-at-inference overhead (time)": (m["AlignMamba-2, OT at inference (ours)"]["time_ms"]
                                                         / m["AlignMamba-2"]["time_ms"] - 1),
    }


def validation_curve(workdir, metric):
    """(steps, values) of `valid/<metric>` in a run's metrics.jsonl."""
    steps, values = [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if f"valid/{metric}" in record:
                steps.append(int(record["step"]))
                values.append(float(record[f"valid/{metric}"]))
    return steps, values


def curve_panels(curves):
    """{task: (metric, {label: [(steps, values) per seed]})} -> plot_curve_panels' panels (mean ± std over
    the seeds, on the steps all of them logged)."""
    panels = []
    for task, (metric, by_label) in curves.items():
        lines = {}
        for label, runs in by_label.items():
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(s) for s, _ in runs)))
            table = np.array([[dict(zip(s, v))[t] for t in steps] for s, v in runs])
            lines[label] = (steps, table.mean(0).tolist(), (table.std(0, ddof=1) if len(runs) > 1
                                                            else np.zeros(len(steps))).tolist())
        panels.append((task, f"validation {metric}", lines))
    return panels


def markdown(accuracy, costs, seeds, per_seed):
    lines = []
    for task, by_model in accuracy.items():
        if not by_model:
            continue
        metrics = list(next(iter(by_model.values())))
        lines += [f"**{task}** (test, best-validation checkpoint, mean ± std over the finished runs of seeds "
                  f"{list(seeds)}: " + ", ".join(f"{k} {len(v)}" for k, v in per_seed.get(task, {}).items()) + ")", "",
                  "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for model, stats in by_model.items():
            lines.append(f"| {model} | " + " | ".join(
                study.fmt(*stats[m], digits=4 if m in ("MAE", "Corr") else 3) for m in metrics) + " |")
        lines.append("")
    for task, cost in costs.items():
        lines += [f"**{task} inference** (inputs {cost['batch_shapes']}, median of repeats, side by side)", "",
                  "| model | median time (ms) | min time (ms) | FLOPs |", "|---|---|---|---|"]
        for label, v in cost["models"].items():
            lines.append(f"| {label} | {v['time_ms']:.2f} | {v['time_min_ms']:.2f} | {v['flops']:.4e} |")
        lines.append("")
        for k, v in cost_ratios(cost).items():
            lines.append(f"- {k}: {100 * v:+.1f}%" if "overhead" in k else f"- {k}: {v:.2f}x")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = common.parser(__doc__)
    study.add_common_args(p, default_root=os.path.join(study.REPO, "runs", "bench"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    common.add_repeats(p, 10, warmup=2)
    p.add_argument("--skip_training", action="store_true", help="inference cost only")
    common.add_json(p, required=True)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None, help="PNG of the validation curves")
    args = p.parse_args(argv)
    base = study.common_overrides(args)

    accuracy, costs, per_seed = {}, {}, {}
    payload = {"rows": [list(m) for m in MODELS], "overrides": base, "seeds": args.seeds}
    curves = {}
    for task in args.tasks:
        task_over = task_overrides(task)
        print(f"[am2] inference cost, {task}", flush=True)
        costs[task] = inference_cost(task_over, base, args.repeats, args.warmup)
        costs[task]["ratios"] = cost_ratios(costs[task])
        study.write_json(args.json, {**payload, "accuracy": accuracy, "inference": costs, "per_seed": per_seed})
    for task in ([] if args.skip_training else args.tasks):
        task_over = task_overrides(task)
        root = os.path.join(args.workdir_root, "synthetic" if task == "sentiment" else task)
        per_seed[task] = {label: {} for label, *_ in MODELS}
        select = task_over.get("eval.select_metric") or "Corr"
        curves[task] = (select, {label: [] for label, *_ in MODELS})
        for seed in args.seeds:
            for label, name, config_file, variant in MODELS:
                print(f"[am2] {task} {label} seed {seed}", flush=True)
                config = study.make_config(config_file, variant, {**base, **task_over}, seed)
                workdir = os.path.join(root, f"{name}_s{seed}")
                results = study.run(config, workdir, reuse_only=args.reuse_only)
                if results is None:
                    continue
                curves[task][1][label].append(validation_curve(workdir, select))
                metrics = TASK_METRICS[task] or sorted(k for k, v in results["test"].items()
                                                       if isinstance(v, (int, float)))
                per_seed[task][label][seed] = {m: float(results["test"][m]) for m in metrics}
                accuracy[task] = {lab: {m: study.mean_std([r[m] for r in runs.values()]) for m in metrics}
                                  for lab, runs in per_seed[task].items() if runs}
                study.write_json(args.json, {**payload, "accuracy": accuracy, "inference": costs,
                                             "per_seed": per_seed})
    if args.plot and curves:
        from plotting import plot_curve_panels
        plot_curve_panels(curve_panels(curves), "training step", args.plot,
                          title="Validation curves (mean ± std over seeds)")
    table = markdown(accuracy, costs, args.seeds, per_seed)
    print(table)
    if args.markdown:
        study.write_text(args.markdown, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
