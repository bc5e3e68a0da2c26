"""What a model does with samples whose anchor modality is missing, under the `per_sample` protocol.

Loads the best checkpoint of a trained workdir (a run of `python -m alignmamba_jax.main --config CONFIG`), masks
the test split with `alignmamba_jax.data.missing.PROTOCOLS["per_sample"]` at each rate (the seeds of
`train_and_evaluate`'s own sweep, so the same masks) and reports the test metrics over all samples and over the
samples whose anchor (data.anchor) was dropped, with the spread of their predictions (0 = one constant, the
"no information" output). It evaluates with the installed alignmamba_jax: run it where an older checkout is
installed (`pip install -e <checkout>`) to compare before / after a change of the missing-anchor rule on the same
parameters.

    python benchmarks/missing_anchor.py --workdir runs/synthetic_s0 --json benchmarks/results/missing_anchor.json
"""
import functools
import json
import os
import sys

import jax
import numpy as np

import common
import study
from ot_plan import restore_params

METRICS = ("Non0_acc_2", "Non0_F1_score", "MAE", "Corr")


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--workdir", required=True, help="a trained run (its best/ checkpoint is evaluated)")
    p.add_argument("--config", default="configs/synthetic.py", help="the run's config file ...")
    p.add_argument("--variant", default=None, help="... and variant")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="... and overrides")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    common.add_json(p, required=True)
    args = p.parse_args(argv)

    from alignmamba_jax import data as data_lib, input_pipeline, train
    config = study.apply_overrides(study.load_config(args.config, args.variant), study.parse_overrides(args.set))
    splits = data_lib.load_splits(config.data)
    mesh = train.create_mesh(1)
    model = train.create_model_for_data(config, splits)
    params, best_step = restore_params(args.workdir)

    modalities, anchor = tuple(config.data.modalities), config.data.anchor
    protocol = data_lib.missing.PROTOCOLS["per_sample"]
    sharding = train.batch_sharding(mesh)
    size = config.eval.batch_size
    rows = input_pipeline.process_rows(sharding, size)
    step = jax.jit(functools.partial(train.eval_step, apply_fn=model.apply, modalities=modalities))
    labels = np.asarray(splits["test"]["labels"])
    n = input_pipeline.split_size(splits["test"])
    results = {"workdir": os.path.abspath(args.workdir), "best_step": int(best_step), "by_rate": {}}
    for rate in args.rates:
        predictions, missing = [], []
        for i, batch in enumerate(input_pipeline.local_eval_batches(splits["test"], modalities, size, rows)):
            batch = {**batch, **protocol(batch, rate, config.eval.missing_seed * 1_000_003 + i, modalities, anchor)}
            predictions.append(np.asarray(step(params, input_pipeline.to_global(batch, sharding, size))))
            missing.append(~np.asarray(batch[anchor + "_mask"]).any(-1))
        pred, missing = np.concatenate(predictions)[:n], np.concatenate(missing)[:n]
        every, without = (train.split_metrics(config.data, pred[s], labels[s]) for s in (slice(None), missing))
        results["by_rate"][f"{rate:g}"] = {
            "all": {k: every[k] for k in METRICS}, "anchor_missing": {k: without[k] for k in METRICS[:3]},
            "n_anchor_missing": int(missing.sum()), "prediction_std_anchor_missing": float(pred[missing].std())}
        print(f"rate {rate:g}: all {json.dumps(results['by_rate'][f'{rate:g}']['all'])}; "
              f"{int(missing.sum())} without {anchor}: {json.dumps(results['by_rate'][f'{rate:g}']['anchor_missing'])}, "
              f"prediction std {float(pred[missing].std()):.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
