"""Training-step time of the AlignMamba-2 demo against the AlignMamba demo, side by side.

Each row is the jitted training step (forward, backward, AdamW) of a demo config on one batch of its own
synthetic training data (the demo's batch size and shapes):
  AlignMamba                         configs/synthetic.py
  AlignMamba-2                       configs/alignmamba2_synthetic.py (Sinkhorn term: `sinkhorn_distance`; MMD
                                     of the resampled tokens)
  AlignMamba-2, MMD on every frame   configs/alignmamba2_synthetic.py:mmd_frames (MMD of every projected frame)
  AlignMamba-2, unrolled Sinkhorn    the same, its Sinkhorn term `sinkhorn` with sinkhorn_iters iterations
                                     differentiated by unrolling (the regulariser before `sinkhorn_distance`)
  AlignMamba-2 w/o Sinkhorn          configs/alignmamba2_synthetic.py:wo_sinkhorn (MMD only)
  AlignMamba-2 w/o MMD               configs/alignmamba2_synthetic.py:wo_mmd (Sinkhorn only)
  AlignMamba-2 w/o alignment         configs/alignmamba2_synthetic.py:wo_align (neither regulariser)
  ..., token projections by autodiff AlignMamba and AlignMamba-2 with their token projections as `nn.Dense`
                                     under plain autodiff instead of `TokenDense` (same parameters and values)
After compilation, rounds alternate between the rows (each of the `--repeats` rounds times `--steps` steps of
every row), and the table reports each row's median step time over rounds and its ratio to AlignMamba's: on a
shared machine the load drifts, and round-robin rounds see the same drift.

    python benchmarks/am2_step_time.py [--repeats 5 --steps 3] [--json OUT]
"""
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

import common
import study
from alignmamba_jax import data as data_lib, models, train
from alignmamba_jax.align import sinkhorn


def unrolled_distance(cost, x_mask, y_mask, *, epsilon, max_iters, tolerance):
    del tolerance
    return sinkhorn(cost, x_mask, y_mask, epsilon=epsilon, num_iters=max_iters)[1]


def autodiff_dense(features, dtype, name):
    return nn.Dense(features, dtype=dtype, name=name)


UNROLLED = {"sinkhorn_distance": unrolled_distance}
AUTODIFF_PROJECTIONS = {"TokenDense": autodiff_dense}
ROWS = (  # (label, config file, variant, {models' function: what replaces it while the step is traced})
    ("AlignMamba", "configs/synthetic.py", "full", {}),
    ("AlignMamba-2", "configs/alignmamba2_synthetic.py", "full", {}),
    ("AlignMamba-2, MMD on every frame", "configs/alignmamba2_synthetic.py", "mmd_frames", {}),
    ("AlignMamba-2, unrolled Sinkhorn", "configs/alignmamba2_synthetic.py", "full", UNROLLED),
    ("AlignMamba-2 w/o Sinkhorn", "configs/alignmamba2_synthetic.py", "wo_sinkhorn", {}),
    ("AlignMamba-2 w/o MMD", "configs/alignmamba2_synthetic.py", "wo_mmd", {}),
    ("AlignMamba-2 w/o alignment", "configs/alignmamba2_synthetic.py", "wo_align", {}),
    ("AlignMamba, token projections by autodiff", "configs/synthetic.py", "full", AUTODIFF_PROJECTIONS),
    ("AlignMamba-2, token projections by autodiff", "configs/alignmamba2_synthetic.py", "full", AUTODIFF_PROJECTIONS),
)


def build(config_file, variant, replaced, splits):
    config = study.load_config(config_file, variant)
    mesh = train.create_mesh(1)
    model = train.create_model_for_data(config, splits)
    features, masks = train.example_inputs(config, splits)
    state, shardings = train.create_train_state(config, model, features, masks, mesh)
    n = config.train.batch_size
    batch = {"labels": np.asarray(splits["train"]["labels"][:n], np.float32), "weights": np.ones((n,), np.float32)}
    for m in config.data.modalities:
        batch[m] = np.asarray(splits["train"][m][:n], np.float32)
        batch[m + "_mask"] = np.asarray(splits["train"][m + "_mask"][:n], bool)
    batch = jax.device_put(batch, train.batch_sharding(mesh))
    step = jax.jit(lambda s, b: train.train_step(s, b, config=config), donate_argnums=0)
    originals = {name: getattr(models, name) for name in replaced}
    for name, replacement in replaced.items():
        setattr(models, name, replacement)              # traced now: the compiled step keeps it
    try:
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    finally:
        for name, original in originals.items():
            setattr(models, name, original)
    return {"step": step, "state": state, "batch": batch, "compile_s": time.perf_counter() - t0}


def main(argv=None):
    p = common.parser(__doc__)
    common.add_repeats(p, 5)
    p.add_argument("--steps", type=common.positive_int, default=3, help="training steps timed in each repeat")
    common.add_json(p)
    args = p.parse_args(argv)
    splits = data_lib.load_splits(study.load_config(ROWS[0][1]).data)
    entries = {}
    for label, config_file, variant, replaced in ROWS:
        entries[label] = build(config_file, variant, replaced, splits)
        print(f"compiled {label} in {entries[label]['compile_s']:.1f} s", flush=True)
    times = {label: [] for label in entries}
    for _ in range(args.repeats):
        for label, entry in entries.items():
            times[label].append(common.time_round(entry, args.steps))
    base = float(np.median(times[ROWS[0][0]]))
    rows = {label: {"step_ms": 1e3 * float(np.median(t)), "ratio_to_alignmamba": float(np.median(t)) / base,
                    "compile_s": entries[label]["compile_s"]} for label, t in times.items()}
    print(f"| row | median step (ms) | / AlignMamba | (load average {os.getloadavg()[0]:.1f}) |\n|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['step_ms']:.0f} | {r['ratio_to_alignmamba']:.2f}x | |")
    if args.json:
        study.write_json(args.json, {"rounds": args.repeats, "steps": args.steps, "rows": rows,
                                     "loadavg_end": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
