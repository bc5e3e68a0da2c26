"""Inference efficiency of AlignMamba vs single- and multi-stream Transformers (the paper's Figures 3 and 4).

For each language length L the three models (same d_model and n_layers) are built from `create_model`, given
random inputs (batch `--batch`, all tokens valid) and measured side by side in one process:
  time_ms       median wall time of `--repeats` jitted forward passes after `--warmup` calls; the models are
                timed round-robin within each repeat so that background load hits all of them alike (every
                repeat's time is kept as time_ms_repeats; the summary gives the spread of the per-repeat ratios)
  memory_bytes  the compiled program's memory analysis: argument + output + temp bytes (minus aliased)
  flops         a scan-aware count over the jaxpr (see `count_flops`): XLA's `cost_analysis()` counts the body
                of a `while` loop once, whatever its trip count, so it undercounts a recurrent scan by ~L times;
                XLA's number is printed beside ours for reference. Outputs other than the prediction are
                dead-code eliminated first (XLA does the same), e.g. AlignMamba's MMD loss at inference.
Doubling (`--doubling_lengths`): AlignMamba and its linear part alone ("mamba_fusion_only": projections,
Mamba stack over the 3L concatenated tokens, no OT/MMD) at lengths L, 2L, 4L..., all compiled first and timed
round-robin in one loop, so that time(2L)/time(L) is not skewed by load changing between lengths; written to
`--doubling_json` (same row schema, those two model names).
Attention (`--attention_impls`): the Transformers run with Flax's attention ("xla": logits materialised, the
papers' kind of baseline) and, on a GPU by default, also with cuDNN's fused flash attention ("cudnn", model key
`attention_impl`), in rows named e.g. "transformer_single+cudnn", so that no claim rests on a weak baseline;
a fused row takes the FLOP count of its "xla" twin (the same arithmetic; the fused call is opaque to the count),
or 0 if the twin did not run.
Audio and video lengths either equal L (`--av_lengths equal`, fused tokens = 3L, the paper's axis: L = 2176 is
6.5k fused tokens) or follow CMU-MOSI's unaligned proportions 50:375:500 (`--av_lengths mosi`).

    python benchmarks/efficiency.py --lengths 50 100 200 400 800 1600 2176 4352 --json eff.json
"""
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import common

MODELS = ("alignmamba", "transformer_single", "transformer_multi")
MOSI_INPUT_DIMS = {"text": 768, "audio": 5, "vision": 20}
MOSI_LENGTH_RATIO = {"text": 1.0, "audio": 375 / 50, "vision": 500 / 50}
PAPER_REDUCTION = {  # paper, at 6.4k fused tokens: (memory, time) reduction of AlignMamba vs the model
    "transformer_single": (0.203, 0.833),
    "transformer_multi": (0.580, 0.876),
}

# Primitives costing one flop per output element; data movement (reshape, slice, gather, convert...) is free.
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "exp", "exp2", "log", "log1p",
    "expm1", "tanh", "logistic", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "erf", "erf_inv", "sin", "cos",
    "tan", "atan2", "square", "reciprocal", "select_n", "clamp", "floor", "ceil", "round", "nextafter",
    "add_any", "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not", "xor",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "cumsum",
               "cumprod", "cummax", "cumlogsumexp", "reduce_and", "reduce_or"}


def _size(aval):
    return int(np.prod(aval.shape)) if hasattr(aval, "shape") else 1


def _sub_jaxprs(params):
    for value in params.values():
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def count_flops(jaxpr):
    """Flops of a jaxpr: 2*M*N*K per matmul/conv, one per element for arithmetic, loop bodies times trip count.

    Returns (flops, n_unbounded_loops): `while` bodies (unknown trip count) are counted once and reported.
    """
    flops, loops = 0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            flops += 2 * _size(eqn.outvars[0].aval) * int(np.prod([lhs.shape[d] for d in lc]))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            flops += 2 * _size(eqn.outvars[0].aval) * _size(rhs) // rhs.shape[out_feature_dim]
        elif name in _ELEMENTWISE:
            flops += sum(_size(v.aval) for v in eqn.outvars)
        elif name in _REDUCTIONS:
            flops += sum(_size(v.aval) for v in eqn.invars)
        elif name == "scan":
            f, n = count_flops(eqn.params["jaxpr"].jaxpr)
            flops, loops = flops + eqn.params["length"] * f, loops + n
        elif name == "while":
            f, n = count_flops(eqn.params["body_jaxpr"].jaxpr)
            flops, loops = flops + f, loops + n + 1
        elif name == "cond":
            costs = [count_flops(b.jaxpr) for b in eqn.params["branches"]]
            flops, loops = flops + max(c[0] for c in costs), loops + max(c[1] for c in costs)
        else:
            trips = 1
            if name == "pallas_call":
                trips = int(np.prod(eqn.params["grid_mapping"].grid))
            for sub in _sub_jaxprs(eqn.params):
                f, n = count_flops(sub)
                flops, loops = flops + trips * f, loops + n
    return flops, loops


def dce(closed_jaxpr):
    """The jaxpr without equations that do not reach its outputs (XLA would not run them either)."""
    try:
        from jax._src.interpreters import partial_eval as pe
    except ImportError:  # private module moved: count without elimination (an overestimate)
        return closed_jaxpr.jaxpr
    jaxpr, _ = pe.dce_jaxpr(closed_jaxpr.jaxpr, [True] * len(closed_jaxpr.jaxpr.outvars))
    return jaxpr


def modality_lengths(text_len, av_lengths):
    if av_lengths == "equal":
        return {m: text_len for m in MOSI_INPUT_DIMS}
    return {m: max(1, int(round(text_len * MOSI_LENGTH_RATIO[m]))) for m in MOSI_INPUT_DIMS}


FUSION_ONLY = {"name": "alignmamba", "fusion": "single_stream", "use_local_alignment": False,
               "use_global_alignment": False}


def build(name, args):
    """`name` is a model name, "mamba_fusion_only", or a Transformer with its attention: "transformer_single+cudnn"."""
    from alignmamba_jax.models import create_model, default_model_config
    cfg = default_model_config()
    name, _, attention_impl = name.partition("+")
    cfg.name = name
    cfg.attention_impl = attention_impl or "xla"
    if name == "mamba_fusion_only":
        cfg.update(FUSION_ONLY)
    cfg.d_model = args.d_model
    cfg.n_layers = args.n_layers
    cfg.dropout = 0.0
    if args.scan_backend:
        cfg.scan_backend = args.scan_backend
    return create_model(cfg, modalities=tuple(MOSI_INPUT_DIMS), anchor="text", input_dims=MOSI_INPUT_DIMS,
                        task="regression", num_classes=1)


def make_inputs(lengths, batch, seed=0):
    rng = np.random.default_rng(seed)
    feats = {m: jnp.asarray(rng.standard_normal((batch, t, MOSI_INPUT_DIMS[m]), dtype=np.float32))
             for m, t in lengths.items()}
    masks = {m: jnp.ones((batch, t), bool) for m, t in lengths.items()}
    return feats, masks


def prepare(name, model, lengths, args):
    """Init params on tiny inputs (parameters do not depend on length), compile at full size, analyse."""
    small = {m: min(t, 8) for m, t in lengths.items()}
    params = model.init(jax.random.PRNGKey(0), *make_inputs(small, 1), train=False)["params"]
    feats, masks = make_inputs(lengths, args.batch)

    def forward(params, feats, masks):
        return model.apply({"params": params}, feats, masks, train=False)["prediction"]

    lowered = jax.jit(forward).lower(params, feats, masks)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                     - mem.alias_size_in_bytes)
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) else xla) or {}
    flops, loops = (0, 0) if "+" in name else count_flops(dce(jax.make_jaxpr(forward)(params, feats, masks)))
    run = lambda: jax.block_until_ready(compiled(params, feats, masks))  # noqa: E731
    for _ in range(args.warmup):
        run()
    return run, dict(memory_bytes=memory, flops=int(flops), xla_flops=xla.get("flops"), open_loops=loops)


def measure(pairs, args):
    """Compiles every (model, text_len) program, then times them round-robin; returns rows (schema above)."""
    runs, info, times = {}, {}, {}
    for name, text_len in pairs:
        try:
            runs[name, text_len], info[name, text_len] = prepare(
                name, build(name, args), modality_lengths(text_len, args.av_lengths), args)
            times[name, text_len] = []
        except Exception as e:  # noqa: BLE001  (out of memory at long lengths is an expected outcome)
            print(f"  {name:19s} L={text_len:5d}: skipped ({type(e).__name__}: {str(e)[:120]})", flush=True)
    for _ in range(args.repeats):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(1e3 * (time.perf_counter() - t0))
    rows = []
    xla_flops = {(n, L): i["flops"] for (n, L), i in info.items() if "+" not in n}
    for (name, text_len), i in info.items():
        if "+" in name:  # the fused attention is one opaque call: its arithmetic is its xla twin's (0 if none ran)
            i["flops"] = xla_flops.get((name.partition("+")[0], text_len), 0)
        tokens = sum(modality_lengths(text_len, args.av_lengths).values())
        row = dict(model=name, text_len=text_len, tokens=tokens, time_ms=float(np.median(times[name, text_len])),
                   memory_bytes=i["memory_bytes"], flops=i["flops"], time_ms_repeats=times[name, text_len])
        rows.append(row)
        xla = i["xla_flops"]
        print(f"  {name:19s} L={text_len:5d} tokens={tokens:6d} time={row['time_ms']:10.2f} ms "
              f"mem={row['memory_bytes'] / 2**20 if row['memory_bytes'] is not None else float('nan'):9.1f} MiB "
              f"flops={row['flops']:.3e} (xla cost_analysis {xla if xla is None else f'{xla:.3e}'}"
              f"{', %d while-loop(s) counted once' % i['open_loops'] if i['open_loops'] else ''})",
              flush=True)
    return rows


def doubling_lines(rows, models):
    by = {(r["model"], r["text_len"]): r for r in rows}
    lines = []
    for model in models:
        lens = sorted(L for (m, L) in by if m == model)
        for L in lens:
            if 2 * L in lens:
                a, b = by[model, L], by[model, 2 * L]
                lines.append(f"doubling {model}: time({2 * L})/time({L}) = {b['time_ms'] / a['time_ms']:.2f}, "
                             f"memory ratio {b['memory_bytes'] / a['memory_bytes']:.2f}, "
                             f"flops ratio {b['flops'] / a['flops']:.2f}")
    return lines


def time_ratio_spread(a, b):
    """', time ratio per repeat min / median / max' of row a over row b (timed round-robin: repeat i of both ran
    back to back), or '' where the rows carry no per-repeat times."""
    ra, rb = a.get("time_ms_repeats"), b.get("time_ms_repeats")
    if not ra or not rb or len(ra) != len(rb):
        return ""
    ratios = np.asarray(ra) / np.asarray(rb)
    return (f", time ratio per repeat {ratios.min():.3f} / {np.median(ratios):.3f} / {ratios.max():.3f} "
            f"(min / median / max of {len(ratios)})")


def summarize(rows, min_tokens=6400):
    """Reductions of AlignMamba vs each Transformer at the longest length >= min_tokens, and doubling ratios."""
    by = {(r["model"], r["text_len"]): r for r in rows}
    lines = []
    am_lengths = sorted(L for (m, L) in by if m == "alignmamba")
    others = [(m, PAPER_REDUCTION[m.partition("+")[0]]) for m in sorted({m for m, _ in by})
              if m.partition("+")[0] in PAPER_REDUCTION]
    for other, (p_mem, p_time) in others or PAPER_REDUCTION.items():
        common = [L for L in am_lengths if (other, L) in by and by["alignmamba", L]["tokens"] >= min_tokens]
        if not common:
            lines.append(f"vs {other}: no common length with >= {min_tokens} fused tokens")
            continue
        for L in common:
            a, b = by["alignmamba", L], by[other, L]
            d_time = 1 - a["time_ms"] / b["time_ms"]
            d_mem = (1 - a["memory_bytes"] / b["memory_bytes"]) if a["memory_bytes"] and b["memory_bytes"] else float("nan")
            d_flops = 1 - a["flops"] / b["flops"] if b["flops"] else float("nan")
            lines.append(f"vs {other} at L={L} ({a['tokens']} tokens): memory -{100 * d_mem:.1f}% "
                         f"(paper -{100 * p_mem:.1f}%), time -{100 * d_time:.1f}% (paper -{100 * p_time:.1f}%), "
                         f"flops -{100 * d_flops:.1f}%{time_ratio_spread(a, b)}")
    lines += [l + " (lengths timed in separate loops)" for l in doubling_lines(rows, MODELS)]
    return lines


def main(argv=None):
    from alignmamba_jax.models import ATTENTION_IMPLS
    p = common.parser(__doc__)
    common.add_lengths(p, [50, 100, 200, 400, 800, 1088, 1600, 2176, 4352], help="language lengths L")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--scan_backend", default=None, help="override the model config's scan backend")
    p.add_argument("--av_lengths", choices=("equal", "mosi"), default="equal")
    common.add_repeats(p, 5, warmup=2)
    p.add_argument("--attention_impls", nargs="+", default=None, choices=ATTENTION_IMPLS,
                   help="the Transformers' attention implementations, each timed (default: xla and cudnn on a "
                        "GPU, xla elsewhere)")
    p.add_argument("--max_tokens", type=int, default=None,
                   help="skip the Transformers above this many fused tokens (memory guard)")
    p.add_argument("--doubling_lengths", type=common.positive_ints, nargs="+", default=[], metavar="L",
                   help="AlignMamba and mamba_fusion_only at these lengths, timed in one round-robin loop")
    p.add_argument("--doubling_json", default=None)
    common.add_json(p, required=True, help='write {"rows": [...]} here (rewritten after every length)')
    p.add_argument("--plot_dir", default=None, help="write efficiency_time.png / efficiency_memory.png here")
    common.add_device(p)
    args = p.parse_args(argv)
    common.select_device(args.device)

    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},"
          f" {os.cpu_count()} cpus); d_model={args.d_model} n_layers={args.n_layers} batch={args.batch} "
          f"av_lengths={args.av_lengths} repeats={args.repeats}", flush=True)
    impls = args.attention_impls or (["xla", "cudnn"] if jax.default_backend() == "gpu" else ["xla"])
    variants = [m if impl == "xla" else f"{m}+{impl}" for m in args.models
                for impl in (impls if m.startswith("transformer") else ["xla"])]
    rows = []
    for L in args.lengths:
        tokens = sum(modality_lengths(L, args.av_lengths).values())
        models = [m for m in variants
                  if m == "alignmamba" or args.max_tokens is None or tokens <= args.max_tokens]
        rows.extend(measure([(m, L) for m in models], args))
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:  # rewritten after every length: a killed run keeps what it measured
            json.dump({"rows": rows}, f, indent=1)
    for line in summarize(rows):
        print(line)
    if args.doubling_lengths:
        print("# doubling: all lengths compiled first, timed round-robin", flush=True)
        drows = measure([(m, L) for L in args.doubling_lengths for m in ("alignmamba", "mamba_fusion_only")], args)
        if args.doubling_json:
            with open(args.doubling_json, "w") as f:
                json.dump({"rows": drows}, f, indent=1)
        for line in doubling_lines(drows, ("alignmamba", "mamba_fusion_only")):
            print(line)
    if args.plot_dir:
        from plotting import plot_efficiency
        plot_efficiency(rows, "time_ms", "inference time (ms)", os.path.join(args.plot_dir, "efficiency_time.png"),
                        title=f"Inference time, batch {args.batch}")
        plot_efficiency(rows, "memory_bytes", "memory (MiB)", os.path.join(args.plot_dir, "efficiency_memory.png"),
                        scale=1 / 2**20, title="Compiled memory (args + outputs + temps)")
    if any(math.isnan(r["time_ms"]) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
