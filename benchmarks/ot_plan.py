"""OT plan of a trained AlignMamba on the synthetic default: a heat map and how often it matches the truth.

Restores the best-validation checkpoint of a finished run (e.g. one of benchmarks/ablation.py's "full" runs),
applies the model with `return_plans=True` to test samples and
  - draws the audio -> language plan of one sample with `alignmamba_jax.visualize.plot_ot_plan`;
  - measures collapse: the share of each plan's mass that lands on its most-receiving text token;
  - scores every plan against the generator's oracle alignment (`audio_word` / `vision_word`: the text
    position of the word each frame belongs to): the fraction of in-word frames whose largest plan entry is
    their word's text token. The same score is given for the untrained (initial) parameters, for the
    segment-mean resampling of the "w/o local" ablation, and for chance (1 / valid text tokens).

    python benchmarks/ot_plan.py --workdir runs/bench/synthetic/full_s0 \
        --png benchmarks/figures/ot_plan.png --json benchmarks/results/ot_plan.json
"""
import os
import sys

import numpy as np

import common
import study

SOURCES = ("audio", "vision")


def restore_params(workdir):
    """Parameters of the best-validation checkpoint in workdir/best (as saved by train_and_evaluate)."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "best"))
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"{workdir}/best holds no checkpoint: is it a finished train_and_evaluate run?")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"], step


def alignment_accuracy(plans, truth, masks):
    """Fraction of in-word frames (truth >= 1) whose plan row peaks at their word's text position."""
    hits, total = 0, 0
    for plan, word, mask in zip(plans, truth, masks):
        inside = mask & (word >= 1)
        hits += int(np.sum(np.argmax(plan, axis=-1)[inside] == word[inside]))
        total += int(np.sum(inside))
    return hits / max(total, 1)


def hub_share(plans, masks):
    """Mean over samples of the share of transported mass landing on the single most-receiving anchor token
    (1 / valid anchor tokens for an even spread; 1.0 when every frame is sent to one token)."""
    shares = []
    for plan, mask in zip(plans, masks):
        if mask.any():
            received = plan[mask].sum(axis=0)
            shares.append(float(received.max() / max(received.sum(), 1e-12)))
    return float(np.mean(shares))


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--workdir", required=True, help="a finished run of configs/synthetic.py (full variant)")
    p.add_argument("--config", default="configs/synthetic.py")
    p.add_argument("--variant", default="full", help="the config variant the run used, e.g. paper_ot")
    p.add_argument("--preset", choices=sorted(study.PRESETS), default="small", help="as the run used")
    p.add_argument("--steps", type=int, default=None, help="train.steps the run used (only for its config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="as the run used")
    p.add_argument("--n_samples", type=int, default=128, help="test samples scored")
    p.add_argument("--sample", type=int, default=0, help="test sample drawn")
    p.add_argument("--png", required=True)
    common.add_json(p)
    args = p.parse_args(argv)

    import jax
    from alignmamba_jax.align import segment_mean_resample
    from alignmamba_jax.data import synthetic
    from alignmamba_jax.train import create_model_for_data
    from alignmamba_jax.visualize import plot_ot_plan

    overrides = dict(study.PRESETS[args.preset])
    overrides.update(study.parse_overrides(args.set))
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    config = study.make_config(args.config, args.variant, overrides, 0)
    config.model.return_plans = True
    splits = synthetic.generate_sentiment(config.data.synthetic)
    test = splits["test"]
    n = min(args.n_samples, len(test["labels"]))
    modalities = tuple(config.data.modalities)
    feats = {m: test[m][:n] for m in modalities}
    masks = {m: test[m + "_mask"][:n] for m in modalities}
    model = create_model_for_data(config, splits)
    params, step = restore_params(args.workdir)
    init_params = model.init(jax.random.PRNGKey(0), feats, masks, train=False)["params"]

    apply = jax.jit(lambda p: model.apply({"params": p}, feats, masks, train=False)["ot_plans"])
    trained, initial = jax.device_get(apply(params)), jax.device_get(apply(init_params))
    report = {"workdir": args.workdir, "checkpoint_step": int(step), "n_samples": n, "accuracy": {},
              "hub_share": {}}
    for m in SOURCES:
        truth, mask = test[f"{m}_word"][:n].astype(np.int64), masks[m]
        seg_plan = np.asarray(segment_mean_resample(np.asarray(feats[m]), feats["text"].shape[1], mask,
                                                    masks["text"])[1])
        report["accuracy"][m] = {
            "trained OT": alignment_accuracy(trained[m], truth, mask),
            "initial OT": alignment_accuracy(initial[m], truth, mask),
            "segment-mean (w/o local)": alignment_accuracy(seg_plan, truth, mask),
            "chance": float(np.mean(1.0 / masks["text"].sum(-1))),
        }
        report["hub_share"][m] = {
            "trained OT": hub_share(trained[m], mask), "initial OT": hub_share(initial[m], mask),
            "segment-mean (w/o local)": hub_share(seg_plan, mask),
        }
    for m, acc in report["accuracy"].items():
        print(f"{m:7s} -> language, share of in-word frames mapped to their word: "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        print(f"{m:7s} -> language, share of mass on the most-receiving text token: "
              + ", ".join(f"{k} {v:.3f}" for k, v in report["hub_share"][m].items()))

    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    i = args.sample
    ids = test["token_ids"][i]
    n_text = int(masks["text"][i].sum())
    labels = ["[CLS]"] + [f"w{int(t)}" for t in ids[1:n_text - 1]] + ["[SEP]"]
    plot_ot_plan(trained["audio"][i], args.png, source_name="audio", anchor_name="language",
                 source_mask=masks["audio"][i], anchor_mask=masks["text"][i], anchor_tokens=labels,
                 reference=np.where(test["audio_word"][i] >= 1, test["audio_word"][i], -1),
                 title=f"OT plan, test sample {i} (oracle match "
                       f"{report['accuracy']['audio']['trained OT']:.0%} over {n} samples)")
    print(f"wrote {args.png}")
    if args.json:
        study.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
