"""AlignMamba-2 (training-only OT + MMD regularisers, Modality-Aware Mamba layers) on the mosi setup.

Everything but the model name comes from configs/mosi.py; parameter strings work the same way
(`configs/alignmamba2_mosi.py:wo_global`).
"""
import importlib.util
import os


def get_config(variant: str = "full"):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mosi.py")
    spec = importlib.util.spec_from_file_location("mosi_config", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    config = base.get_config(variant)
    config.model.name = "alignmamba2"
    return config
