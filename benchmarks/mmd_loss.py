"""Value, gradient and time of AlignMamba-2's MMD regulariser against the plain dense formula.

`mmd` (row tiles, one exponential per pair for the bandwidth ladder, gradient formed in the forward pass) against
the baseline a user would write: the dense (B, T_x, T_y, S) kernels of |a|^2 + |b|^2 - 2ab, one exponential per
bandwidth, differentiated by JAX's autodiff. On the AlignMamba-2 demo's shapes and bandwidths
(configs/alignmamba2_synthetic.py: batch 32, each source's 375 / 500 frames against the 50 language tokens,
`study.am2_regulariser_inputs`), per source:
  value        both (mean over the batch) and their relative difference
  gradient     largest |grad - baseline grad| / largest |baseline grad|, over the source and anchor tokens
  time         median ms of the jitted value-and-gradient, both measured round-robin, and the ratio

    python benchmarks/mmd_loss.py [--repeats 10] [--json OUT]
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import common
import study
from alignmamba_jax.align import mmd


def dense_mmd(x, y, sigma, xm, ym):
    """Biased MMD^2 from the dense kernel arrays, one exponential per bandwidth (the baseline)."""
    sigmas = jnp.asarray(sigma, jnp.float32)
    wx = xm / jnp.maximum(jnp.sum(xm, -1, keepdims=True), 1.0)
    wy = ym / jnp.maximum(jnp.sum(ym, -1, keepdims=True), 1.0)

    def mean_kernel(a, b, wa, wb):
        sq = jnp.maximum(jnp.sum(a * a, -1)[..., :, None] + jnp.sum(b * b, -1)[..., None, :]
                         - 2.0 * jnp.einsum("nid,njd->nij", a, b, precision=jax.lax.Precision.HIGHEST), 0.0)
        k = jnp.mean(jnp.exp(-sq[..., None] / (2.0 * sigmas ** 2)), axis=-1)
        return jnp.einsum("ni,nij,nj->n", wa, k, wb)

    return mean_kernel(x, x, wx, wx) + mean_kernel(y, y, wy, wy) - 2.0 * mean_kernel(x, y, wx, wy)


def main(argv=None):
    p = common.parser(__doc__)
    common.add_repeats(p, 10)
    common.add_json(p)
    args = p.parse_args(argv)

    config = study.load_config("configs/alignmamba2_synthetic.py")
    sigma = tuple(config.model.mmd_sigma)
    sources, shapes = study.am2_regulariser_inputs(config)
    anchor = config.data.anchor

    def loss(kind):
        def f(s, a, sm, am):
            if kind == "mmd":
                return jnp.mean(mmd(s, a, sigma, sm, am))
            return jnp.mean(dense_mmd(s, a, sigma, sm.astype(jnp.float32), am.astype(jnp.float32)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    fns = {"baseline": loss("baseline"), "mmd": loss("mmd")}
    rows = {}
    for m, inputs in sources.items():
        out = {k: jax.block_until_ready(f(*inputs)) for k, f in fns.items()}
        times = common.round_robin_ms(fns, inputs, args.repeats)
        (base_value, base_grad), (value, grad) = out["baseline"], out["mmd"]
        row = {"baseline_value": float(base_value), "value": float(value),
               "value_rel_diff": float(value) / float(base_value) - 1.0,
               "grad_rel_diff": study.grad_rel_diff(grad, base_grad),
               "baseline_ms": float(np.median(times["baseline"])), "mmd_ms": float(np.median(times["mmd"]))}
        row["time_ratio_baseline_over_mmd"] = row["baseline_ms"] / row["mmd_ms"]
        rows[m] = row
        print(f"{m} {tuple(shapes[m])} vs {anchor} {tuple(shapes[anchor])}: value {row['value']:.6g} "
              f"(baseline {row['baseline_value']:.6g}, rel. diff {row['value_rel_diff']:+.1e}), grad rel. diff "
              f"{row['grad_rel_diff']:.1e}; {row['mmd_ms']:.1f} ms vs baseline {row['baseline_ms']:.1f} ms: "
              f"{row['time_ratio_baseline_over_mmd']:.2f}x")
    if args.json:
        study.write_json(args.json, {"sigma": sigma, "shapes": shapes, "sources": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
