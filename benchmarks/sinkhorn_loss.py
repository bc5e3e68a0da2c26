"""Value, gradient and time of AlignMamba-2's Sinkhorn regulariser against the unrolled baseline.

`sinkhorn_distance` (early-stopped while loop, implicit gradient) against the baseline `sinkhorn` (a fixed number
of iterations, differentiated by unrolling), on the AlignMamba-2 demo's shapes: value, gradient (with respect to
the tokens) and time of the regulariser alone.

Tokens: the synthetic default's training features (configs/alignmamba2_synthetic.py: batch 32, language 50,
audio 375, vision 500 tokens, masks included) through a random linear projection to the model width, as at
initialisation. The cost is the cosine cost of each source against the language tokens. Reported, per source:
  value        baseline (50 iterations, the config's cap), new (stopped at the config's tolerance), and the
               converged reference (`sinkhorn` with 300 iterations); largest marginal error of each
  gradient     largest |grad - reference grad| / largest |reference grad|
  time         median ms of the jitted value-and-gradient, baseline and new measured round-robin, and the ratio

    python benchmarks/sinkhorn_loss.py [--repeats 10] [--json OUT]
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import common
import study
from alignmamba_jax.align import cosine_cost, sinkhorn, sinkhorn_distance


def main(argv=None):
    p = common.parser(__doc__)
    common.add_repeats(p, 10)
    common.add_json(p)
    args = p.parse_args(argv)

    config = study.load_config("configs/alignmamba2_synthetic.py")
    model = config.model
    sources, shapes = study.am2_regulariser_inputs(config)
    eps, cap, tol = model.sinkhorn_epsilon, model.sinkhorn_iters, model.sinkhorn_tolerance

    def loss(kind, iters=cap):
        def f(s, a, sm, am):
            c = cosine_cost(s, a)
            if kind == "new":
                return jnp.mean(sinkhorn_distance(c, sm, am, epsilon=eps, max_iters=cap, tolerance=tol))
            return jnp.mean(sinkhorn(c, sm, am, epsilon=eps, num_iters=iters)[1])
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    def error(kind, s, a, sm, am):
        c = cosine_cost(s, a)
        if kind == "new":
            return float(jnp.max(sinkhorn_distance(c, sm, am, epsilon=eps, max_iters=cap, tolerance=tol,
                                                   return_error=True)[1]))
        return float(jnp.max(sinkhorn(c, sm, am, epsilon=eps, num_iters=cap if kind == "baseline" else 300,
                                      return_error=True)[2]))

    fns = {"baseline": loss("baseline"), "new": loss("new"), "reference": loss("reference", 300)}
    rows = {}
    for m, inputs in sources.items():
        out = {k: jax.block_until_ready(f(*inputs)) for k, f in fns.items()}
        ref_value, ref_grad = out["reference"]
        row = {"reference_value": float(ref_value), "reference_error": error("reference", *inputs)}
        times = common.round_robin_ms({k: fns[k] for k in ("baseline", "new")}, inputs, args.repeats)
        for k in times:
            value, grad = out[k]
            row[k] = {"value": float(value), "error": error(k, *inputs),
                      "grad_rel_error": study.grad_rel_diff(grad, ref_grad),
                      "time_ms": float(np.median(times[k]))}
        row["time_ratio_baseline_over_new"] = row["baseline"]["time_ms"] / row["new"]["time_ms"]
        rows[m] = row
        print(f"{m}: reference {row['reference_value']:.6f} (error {row['reference_error']:.1e})")
        for k in times:
            r = row[k]
            print(f"  {k:8s} value {r['value']:.6f} (diff {r['value'] - row['reference_value']:+.1e}, error "
                  f"{r['error']:.1e}), grad rel. error {r['grad_rel_error']:.1e}, {r['time_ms']:.1f} ms")
        print(f"  baseline / new time: {row['time_ratio_baseline_over_new']:.2f}x")
    if args.json:
        study.write_json(args.json, {"epsilon": eps, "iters": cap, "tolerance": tol,
                                     "shapes": shapes, "sources": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
