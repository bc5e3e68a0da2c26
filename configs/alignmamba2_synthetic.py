"""AlignMamba-2 (training-only OT + MMD regularisers, Modality-Aware Mamba layers) on the synthetic setup.

Everything but the model name comes from configs/synthetic.py; parameter strings work the same way
(`configs/alignmamba2_synthetic.py:wo_global`).
"""
import importlib.util
import os


def get_config(variant: str = "full"):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic.py")
    spec = importlib.util.spec_from_file_location("synthetic_config", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    config = base.get_config(variant)
    config.model.name = "alignmamba2"
    return config
