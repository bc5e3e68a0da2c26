"""The embedded default: AlignMamba on the synthetic MOSI-shaped task, small enough for a laptop CPU.

`make demo` runs this; it needs no download. Paper Table 3 ablations by parameter string, e.g.
`--config configs/synthetic.py:wo_local` (names: alignmamba_jax.config.MODEL_VARIANTS).

Local alignment here is the paper's relaxed-OT argmin plan on a learned cost: the cost compares 16-wide
matching projections of the raw features (ot_match_dim), centred per sequence (ot_centred), plus a relative-time
term (ot_time_prior), and the matching projections are trained by the temporal contrastive loss
(ot_contrastive). With the paper's cost alone (variant `paper_ot`) the argmin gets no gradient, the plan stays
at chance against the true word spans and the full model does not beat "w/o local"; benchmarks/RESULTS.md
("Ablation") has the figures.
"""
from alignmamba_jax import config as config_lib


def get_config(variant: str = "full"):
    config = config_lib.default_config()
    config.data.name = "synthetic"
    config.model.update(d_model=64, n_layers=2, d_state=16, dropout=0.1, align_weight=0.1)
    config.model.update(ot_match_dim=16, ot_centred=True, ot_time_prior=0.5, ot_contrastive=1.0,
                        ot_contrastive_tau=1.0, ot_contrastive_sigma=0.1)
    # 1280 training samples: 300 steps are 7.5 epochs; validation plateaus after ~100-200 steps.
    config.train.update(batch_size=32, steps=300, learning_rate=2e-3, warmup_steps=30, log_every=25,
                        eval_every=50, checkpoint_every=100)
    config.eval.batch_size = 64
    return config_lib.apply_model_variant(config, variant)
