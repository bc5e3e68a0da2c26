"""AlignMamba on CMU-MOSI, unaligned features from MMSA (BERT text 768, COVAREP audio 5, Facet vision 20).

Data: MMSA's `MOSI/Processed/unaligned_50.pkl` (see README: "Training on CMU-MOSI / CMU-MOSEI"); set
--config.data.path=... if it lives elsewhere. Model width/depth and optimiser settings are our choices (the
paper does not state them). Ablations: `configs/mosi.py:wo_local` etc. (alignmamba_jax.config.MODEL_VARIANTS).
"""
from alignmamba_jax import config as config_lib


def get_config(variant: str = "full"):
    config = config_lib.default_config()
    config.data.update(name="mmsa", path="data/MOSI/Processed/unaligned_50.pkl")
    config.model.update(d_model=128, n_layers=2, d_state=16, dropout=0.1, align_weight=0.1)
    # 1284 training utterances: 40 steps per epoch at batch 32; 50 epochs, validation once per epoch.
    config.train.update(batch_size=32, steps=2000, learning_rate=5e-4, warmup_steps=200, weight_decay=0.01,
                        log_every=20, eval_every=40, checkpoint_every=200)
    config.eval.update(batch_size=64, missing_rates=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    return config_lib.apply_model_variant(config, variant)
