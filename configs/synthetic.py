"""The embedded default: AlignMamba on the synthetic MOSI-shaped task, small enough for a laptop CPU.

`make demo` runs this; it needs no download. Paper Table 3 ablations by parameter string, e.g.
`--config configs/synthetic.py:wo_local` (names: alignmamba_jax.train.MODEL_VARIANTS).
"""
from alignmamba_jax import train


def get_config(variant: str = "full"):
    config = train.default_config()
    config.data.name = "synthetic"
    config.model.update(d_model=64, n_layers=2, d_state=16, dropout=0.1, align_weight=0.1)
    # 1280 training samples: 300 steps are 7.5 epochs; validation plateaus after ~100-200 steps.
    config.train.update(batch_size=32, steps=300, learning_rate=2e-3, warmup_steps=30, log_every=25,
                        eval_every=50, checkpoint_every=100)
    config.eval.batch_size = 64
    return train.apply_model_variant(config, variant)
