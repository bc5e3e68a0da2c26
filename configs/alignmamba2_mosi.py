"""AlignMamba-2 (training-only OT + MMD regularisers, Modality-Aware Mamba layers) on the mosi setup.

Everything but the model name comes from configs/mosi.py; parameter strings work the same way
(`configs/alignmamba2_mosi.py:wo_sinkhorn`, `:wo_mmd`, `:wo_align`, `:ot_inference`, `:mmd_frames`, `:wo_moe`).
"""
from alignmamba_jax import config as config_lib


def get_config(variant: str = "full"):
    config = config_lib.sibling_config(__file__, "mosi.py", variant)
    config.model.name = "alignmamba2"
    return config
