"""AlignMamba-2 (training-only OT + MMD regularisers, Modality-Aware Mamba layers) on the synthetic setup.

Everything but the model comes from configs/synthetic.py; parameter strings work the same way
(`configs/alignmamba2_synthetic.py:wo_sinkhorn`, `:wo_mmd`, `:wo_align`, `:mmd_frames`, `:wo_moe`). AlignMamba-2
fuses segment-mean resampled sources (the paper), so synthetic.py's local-alignment options are reset to their
defaults; variant `ot_inference` (our extension) keeps them and aligns the sources with AlignMamba's learned-cost
OT instead.
"""
from alignmamba_jax import config as config_lib


def get_config(variant: str = "full"):
    config = config_lib.sibling_config(__file__, "synthetic.py", variant)
    config.model.name = "alignmamba2"
    if config.model.am2_inference_alignment != "ot":
        config.model.update({k: config_lib.default_model_config()[k] for k in config_lib.LOCAL_ALIGNMENT_OPTIONS})
    return config
