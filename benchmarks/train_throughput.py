"""Training throughput (samples/s of the full jit train step: forward, backward, AdamW) on MOSI-shaped data.

AlignMamba and the single-stream Transformer baseline at the same width are measured side by side: `--repeats`
rounds alternate between the models, each round times `--steps` steps after compilation, and the table reports the
median over rounds. Inputs are random arrays in the shapes of MMSA's unaligned MOSI (text 50 x 768, audio
375 x 5, vision 500 x 20, every token valid), so only the model's cost is measured, not data loading.
On a GPU the Transformer is measured twice by default, with Flax's attention and with cuDNN's fused attention
("transformer_single+cudnn", model key `attention_impl`); a model that fails to build or compile is reported
under "skipped" and the others are measured.

    python benchmarks/train_throughput.py [--batch_size 16 --d_model 128 --repeats 5 --steps 5]
        [--write_results benchmarks/RESULTS.md]
"""
import datetime
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from alignmamba_jax import train

import common

SHAPES = {"text": (50, 768), "audio": (375, 5), "vision": (500, 20)}
SECTION = "## Training throughput"


def build(model_name, args):
    """`model_name`: a model name, or a Transformer with its attention implementation ("transformer_single+cudnn")."""
    config = train.default_config()
    name, _, attention_impl = model_name.partition("+")
    config.model.update(name=name, d_model=args.d_model, n_layers=args.n_layers, dropout=0.1,
                        attention_impl=attention_impl or "xla")
    config.train.update(batch_size=args.batch_size, steps=10_000, warmup_steps=10)
    mesh = train.create_mesh(1)
    splits = {"train": {m: np.zeros((1, t, d), np.float32) for m, (t, d) in SHAPES.items()}}
    model = train.create_model_for_data(config, splits)
    features, masks = train.example_inputs(config, splits)
    state, shardings = train.create_train_state(config, model, features, masks, mesh)
    data_sharding = train.batch_sharding(mesh)
    step = jax.jit(lambda s, b: train.train_step(s, b, config=config), in_shardings=(shardings, data_sharding),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = {"labels": jnp.asarray(rng.uniform(-3, 3, args.batch_size), jnp.float32),
             "weights": jnp.ones((args.batch_size,), jnp.float32)}
    for m, (t, d) in SHAPES.items():
        batch[m] = jnp.asarray(rng.standard_normal((args.batch_size, t, d)), jnp.float32)
        batch[m + "_mask"] = jnp.ones((args.batch_size, t), bool)
    batch = jax.device_put(batch, data_sharding)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {"step": step, "state": state, "batch": batch, "compile_s": compile_s, "params": n_params}


def machine_description():
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return f"{device.platform}: {device.device_kind}; host {cpu}, {os.cpu_count()} cores; jax {jax.__version__}"


def markdown(rows, args, command):
    ref = rows[0]["samples_per_s"]
    lines = [SECTION, "",
             f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} on {machine_description()}.",
             f"Command: `{command}`", "",
             f"Full jit train step (forward, backward, AdamW) on MOSI-shaped random inputs (text 50x768, audio "
             f"375x5, vision 500x20), batch {args.batch_size}, d_model {args.d_model}, {args.n_layers} layers; "
             f"median of {args.repeats} alternating rounds of {args.steps} steps after compilation.", "",
             "| model | params | compile (s) | step (ms) | samples/s | relative to alignmamba |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / ref:.2f}x |")
    if jax.devices()[0].platform == "cpu":
        lines += ["", "CPU figures are for comparing the two models with each other only (shared machine)."]
    return "\n".join(lines) + "\n"


def write_section(path, section):
    """Replaces this benchmark's section of RESULTS.md (creating the file if missing), leaving others intact."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(re.escape(SECTION) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section)
    with open(path, "w") as f:
        f.write(text)


def model_variants(models, attention_impls):
    """Each Transformer once per attention implementation ("xla" keeps the plain name), others once."""
    return [m if impl == "xla" else f"{m}+{impl}" for m in models
            for impl in (attention_impls if m.startswith("transformer") else ["xla"])]


def main(argv=None):
    from alignmamba_jax.models import ATTENTION_IMPLS
    parser = common.parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["alignmamba", "transformer_single"])
    parser.add_argument("--attention_impls", nargs="+", default=None, choices=ATTENTION_IMPLS,
                        help="the Transformers' attention implementations (default: xla and cudnn on a GPU, "
                             "xla elsewhere)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_layers", type=int, default=2)
    common.add_repeats(parser, 5)
    parser.add_argument("--steps", type=int, default=5)
    common.add_json(parser)
    parser.add_argument("--write_results", help="replace the 'Training throughput' section of this file")
    common.add_device(parser)
    args = parser.parse_args(argv)
    common.select_device(args.device)
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    impls = args.attention_impls or (["xla", "cudnn"] if jax.default_backend() == "gpu" else ["xla"])

    entries, skipped = {}, {}
    for name in model_variants(args.models, impls):
        try:
            entries[name] = build(name, args)
        except Exception as error:  # noqa: BLE001  (e.g. no cuDNN attention here: measure the others)
            skipped[name] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{name}: skipped ({skipped[name]})", flush=True)
    times = {name: [] for name in entries}
    for _ in range(args.repeats):
        for name in entries:
            times[name].append(common.time_round(entries[name], args.steps))
    rows = []
    for name in entries:
        step_s = float(np.median(times[name]))
        rows.append({"model": name, "params": int(entries[name]["params"]),
                     "compile_s": entries[name]["compile_s"], "step_ms": 1e3 * step_s,
                     "samples_per_s": args.batch_size / step_s, "round_step_ms": [1e3 * t for t in times[name]]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(), "command": command, "rows": rows, "skipped": skipped}, f,
                      indent=2)
    if not rows:
        return 1
    section = markdown(rows, args, command)
    print(section)
    if args.write_results:
        write_section(args.write_results, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
