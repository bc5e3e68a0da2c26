"""AlignMamba on CMU-MOSEI, unaligned features from MMSA (BERT text 768, COVAREP audio 74, Facet vision 35).

Data: MMSA's `MOSEI/Processed/unaligned_50.pkl`; set --config.data.path=... if it lives elsewhere.
Ablations: `configs/mosei.py:wo_local` etc. (alignmamba_jax.config.MODEL_VARIANTS).
"""
from alignmamba_jax import config as config_lib


def get_config(variant: str = "full"):
    config = config_lib.default_config()
    config.data.update(name="mmsa", path="data/MOSEI/Processed/unaligned_50.pkl", tfds_name="mosei")
    config.model.update(d_model=128, n_layers=2, d_state=16, dropout=0.1, align_weight=0.1)
    # 16326 training utterances: 255 steps per epoch at batch 64; 20 epochs, validation once per epoch.
    config.train.update(batch_size=64, steps=5100, learning_rate=5e-4, warmup_steps=500, weight_decay=0.01,
                        log_every=50, eval_every=255, checkpoint_every=510)
    config.eval.update(batch_size=128, missing_rates=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    return config_lib.apply_model_variant(config, variant)
