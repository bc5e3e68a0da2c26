"""Training-step memory and time of AlignMamba and AlignMamba-2 at long lengths, and our Sinkhorn against ott-jax's.

For each language length L (audio and video lengths equal L, fused tokens 3L: L = 2176 is the 6.5k point of
benchmarks/efficiency.py; MOSI feature widths, batch `--batch`, every token valid, d_model / n_layers as in
efficiency.py) each model is built with `create_model` and its training step, the parameters' gradient of
mean |prediction - label| + align_weight * align_loss with train=True (dropout off), is jitted and measured:
  memory_bytes  the compiled program's memory analysis: argument + output + temp bytes (minus aliased)
  time_ms       median of `--repeats` steps after one warm-up, the models timed round-robin within each repeat;
                left out (null) for a program above `--max_run_bytes`, which is only compiled
Models: alignmamba (`default_model_config()`, the paper's local alignment), alignmamba_shipped (the learned
matching cost of configs/synthetic.py: keys, centring, time prior, contrastive loss), alignmamba2 (training-only
Sinkhorn + MMD), and with `--ott` alignmamba2_ott: AlignMamba-2 whose OT term comes from ott-jax
(`ott.solvers.linear.sinkhorn.Sinkhorn`, implicit differentiation, the same epsilon and exactly
sinkhorn_iters iterations) instead of `alignmamba_jax.align.sinkhorn`.
`--ott` also measures the Sinkhorn distance's gradient alone on an (L x L) cosine cost, ours vs ott-jax.

It measures the installed alignmamba_jax: "before" and "after" rows come from two runs, the "before" one in an
environment where the older checkout is installed (`pip install -e <checkout>`).

    python benchmarks/align_memory.py --lengths 2176 --ott --json benchmarks/results/align_memory.json
"""
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import common

MODELS = ("alignmamba", "alignmamba_shipped", "alignmamba2")
INPUT_DIMS = {"text": 768, "audio": 5, "vision": 20}
SHIPPED_LOCAL = dict(ot_match_dim=16, ot_centred=True, ot_time_prior=0.5, ot_contrastive=1.0)   # synthetic.py


def ott_sinkhorn(cost, x_mask=None, y_mask=None, *, epsilon=0.1, num_iters=100):
    """`alignmamba_jax.align.sinkhorn`'s signature on ott-jax: uniform weights on the valid rows / columns,
    exactly num_iters iterations, implicit differentiation; returns (plan, <plan, cost>)."""
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_solvers

    xm = jnp.ones(cost.shape[:-1], bool) if x_mask is None else x_mask
    ym = jnp.ones(cost.shape[:-2] + cost.shape[-1:], bool) if y_mask is None else y_mask
    solver = ott_solvers.Sinkhorn(threshold=0.0, min_iterations=num_iters, max_iterations=num_iters,
                                  inner_iterations=min(10, num_iters))

    def one(c, a, b):
        a = a / jnp.maximum(a.sum(), 1.0)
        b = b / jnp.maximum(b.sum(), 1.0)
        plan = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=c, epsilon=epsilon), a, b)).matrix
        return plan, jnp.sum(plan * c)

    flat = cost.reshape((-1,) + cost.shape[-2:])
    plan, distance = jax.vmap(one)(flat, xm.reshape(flat.shape[:2]).astype(cost.dtype),
                                   ym.reshape((flat.shape[0], -1)).astype(cost.dtype))
    return plan.reshape(cost.shape), distance.reshape(cost.shape[:-2])


def build(name, args):
    from alignmamba_jax import models
    cfg = models.default_model_config()
    cfg.update(d_model=args.d_model, n_layers=args.n_layers, dropout=0.0)
    if name == "alignmamba_shipped":
        cfg.update(SHIPPED_LOCAL)
    if name.startswith("alignmamba2"):
        cfg.name = "alignmamba2"
    return cfg, models.create_model(cfg, tuple(INPUT_DIMS), "text", INPUT_DIMS)


def inputs(length, batch, seed=0):
    rng = np.random.default_rng(seed)
    feats = {m: jnp.asarray(rng.standard_normal((batch, length, d), dtype=np.float32))
             for m, d in INPUT_DIMS.items()}
    masks = {m: jnp.ones((batch, length), bool) for m in INPUT_DIMS}
    return feats, masks, jnp.asarray(rng.uniform(-3, 3, size=batch), jnp.float32)


def memory_bytes(compiled):
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def prepare_step(name, length, args):
    """(run, memory_bytes) of the jitted training step of model `name` at text length `length`."""
    from alignmamba_jax import models
    cfg, model = build(name, args)
    feats, masks, labels = inputs(length, args.batch)
    small = {m: x[:, :8] for m, x in feats.items()}
    params = model.init(jax.random.PRNGKey(0), small, {m: x[:, :8] for m, x in masks.items()})["params"]

    def loss(p, feats, masks, labels):
        out = model.apply({"params": p}, feats, masks, train=True)
        return jnp.mean(jnp.abs(out["prediction"] - labels)) + cfg.align_weight * out["align_loss"]

    original = models.sinkhorn
    if name == "alignmamba2_ott":
        models.sinkhorn = ott_sinkhorn         # traced now, so the compiled step keeps ott's solver
    try:
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, feats, masks, labels).compile()
    finally:
        models.sinkhorn = original
    return functools.partial(compiled, params, feats, masks, labels), memory_bytes(compiled)


def prepare_sinkhorn(name, length, args):
    """(run, memory_bytes) of the gradient of the Sinkhorn distance of an (L x L) cosine cost, ours or ott's."""
    from alignmamba_jax.align import cosine_cost, sinkhorn
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray(rng.standard_normal((args.batch, length, args.d_model), dtype=np.float32)) for _ in "xy")
    solve = ott_sinkhorn if name == "sinkhorn_ott" else sinkhorn
    cfg = build("alignmamba2", args)[0]

    def distance(a, b):
        return jnp.sum(solve(cosine_cost(a, b), epsilon=cfg.sinkhorn_epsilon, num_iters=cfg.sinkhorn_iters)[1])

    compiled = jax.jit(jax.value_and_grad(distance, argnums=(0, 1))).lower(x, y).compile()
    return functools.partial(compiled, x, y), memory_bytes(compiled)


def measure(jobs, args):
    """jobs: [(kind, name, length)] -> rows; all compiled first, then timed round-robin."""
    runs, rows = {}, []
    for kind, name, length in jobs:
        t0 = time.perf_counter()
        run, mem = (prepare_step if kind == "step" else prepare_sinkhorn)(name, length, args)
        row = dict(kind=kind, model=name, text_len=length, tokens=3 * length if kind == "step" else 2 * length,
                   memory_bytes=mem, time_ms=None, compile_s=round(time.perf_counter() - t0, 1))
        rows.append(row)
        if mem <= args.max_run_bytes:
            jax.block_until_ready(run())
            runs[len(rows) - 1] = (run, [])
        print(f"  {kind:8s} {name:19s} L={length:5d} memory {mem / 2 ** 20:9.1f} MiB "
              f"(compiled in {row['compile_s']} s{'' if mem <= args.max_run_bytes else ', too large to run'})",
              flush=True)
    for _ in range(args.repeats):
        for run, times in runs.values():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(1e3 * (time.perf_counter() - t0))
    for i, (_, times) in runs.items():
        rows[i]["time_ms"] = float(np.median(times))
    return rows


def main(argv=None):
    p = common.parser(__doc__)
    common.add_lengths(p, [2176], help="language lengths L")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--ott", action="store_true", help="also AlignMamba-2 and the Sinkhorn gradient via ott-jax")
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    common.add_repeats(p, 3)
    p.add_argument("--max_run_bytes", type=float, default=4 * 2 ** 30, help="compile only above this")
    common.add_json(p, required=True)
    common.add_device(p)
    args = p.parse_args(argv)
    common.select_device(args.device)
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}, {os.cpu_count()} cpus); "
          f"d_model={args.d_model} n_layers={args.n_layers} batch={args.batch} repeats={args.repeats}", flush=True)
    jobs = [("step", m, L) for L in args.lengths for m in args.models]
    if args.ott:
        jobs += [("step", "alignmamba2_ott", L) for L in args.lengths]
        jobs += [("sinkhorn", n, L) for L in args.lengths for n in ("sinkhorn_ours", "sinkhorn_ott")]
    rows = measure(jobs, args)
    by = {(r["kind"], r["model"], r["text_len"]): r for r in rows}
    for r in rows:
        t = "-" if r["time_ms"] is None else f"{r['time_ms']:.0f} ms"
        print(f"{r['kind']:8s} {r['model']:19s} L={r['text_len']:5d} memory {r['memory_bytes'] / 2 ** 20:9.1f} MiB, "
              f"time {t}")
    for kind, ours, theirs in (("step", "alignmamba2", "alignmamba2_ott"), ("sinkhorn", "sinkhorn_ours", "sinkhorn_ott")):
        for L in args.lengths:
            a, b = by.get((kind, ours, L)), by.get((kind, theirs, L))
            if a and b:
                time_ratio = (f"{b['time_ms'] / a['time_ms']:.2f}x" if a["time_ms"] and b["time_ms"] else "-")
                print(f"ott-jax / ours, {kind} L={L}: memory {b['memory_bytes'] / a['memory_bytes']:.2f}x, "
                      f"time {time_ratio}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "jax": jax.__version__, "device": jax.devices()[0].device_kind}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
