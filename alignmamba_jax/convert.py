"""Weight conversion between PyTorch Mamba mixers (mamba-ssm `Mamba`, transformers `MambaMixer`; both use
the same key names) and `alignmamba_jax.modules.MambaMixer` params. NumPy in, NumPy out: no torch import.

PyTorch layouts: in_proj.weight (2 d_inner, d_model), conv1d.weight (d_inner, 1, d_conv), conv1d.bias,
x_proj.weight (dt_rank + 2 d_state, d_inner), dt_proj.weight (d_inner, dt_rank), dt_proj.bias, A_log
(d_inner, d_state), D (d_inner,), out_proj.weight (d_model, d_inner); in_proj.bias / out_proj.bias optional.
Flax: Dense kernels are the transposed weights; the depthwise Conv kernel is (d_conv, 1, d_inner).
"""
from typing import Dict

import numpy as np

_REQUIRED = ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
             "A_log", "D", "out_proj.weight")


def mamba_mixer_params_from_torch(state_dict: Dict[str, np.ndarray], prefix: str = "") -> Dict:
    """PyTorch mixer state dict (values convertible with np.asarray) -> Flax params of MambaMixer.

    `prefix` selects one mixer from a full model's state dict, e.g. "backbone.layers.0.mixer.".
    """
    sd = {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"state_dict lacks keys {[prefix + k for k in missing]}")
    conv_w = sd["conv1d.weight"]
    if conv_w.ndim != 3 or conv_w.shape[1] != 1:
        raise ValueError(f"state_dict[{prefix + 'conv1d.weight'!r}] must be (d_inner, 1, d_conv), found {conv_w.shape}")
    f32 = lambda a: np.asarray(a, np.float32)
    params = {
        "in_proj": {"kernel": sd["in_proj.weight"].T},
        "conv1d": {"kernel": np.transpose(conv_w, (2, 1, 0))},
        "x_proj": {"kernel": sd["x_proj.weight"].T},
        "dt_proj": {"kernel": f32(sd["dt_proj.weight"].T), "bias": f32(sd["dt_proj.bias"])},
        "A_log": f32(sd["A_log"]),
        "D": f32(sd["D"]),
        "out_proj": {"kernel": sd["out_proj.weight"].T},
    }
    if "conv1d.bias" in sd:
        params["conv1d"]["bias"] = sd["conv1d.bias"]
    for name in ("in_proj", "out_proj"):
        if f"{name}.bias" in sd:
            params[name]["bias"] = sd[f"{name}.bias"]
    return params


def mamba_mixer_params_to_torch(params, prefix: str = "") -> Dict[str, np.ndarray]:
    """Flax MambaMixer params -> PyTorch state dict (NumPy arrays) with mamba-ssm key names."""
    p = {k: (dict(v) if hasattr(v, "keys") else v) for k, v in params.items()}
    sd = {
        "in_proj.weight": np.asarray(p["in_proj"]["kernel"]).T,
        "conv1d.weight": np.transpose(np.asarray(p["conv1d"]["kernel"]), (2, 1, 0)),
        "x_proj.weight": np.asarray(p["x_proj"]["kernel"]).T,
        "dt_proj.weight": np.asarray(p["dt_proj"]["kernel"]).T,
        "dt_proj.bias": np.asarray(p["dt_proj"]["bias"]),
        "A_log": np.asarray(p["A_log"]),
        "D": np.asarray(p["D"]),
        "out_proj.weight": np.asarray(p["out_proj"]["kernel"]).T,
    }
    if "bias" in p["conv1d"]:
        sd["conv1d.bias"] = np.asarray(p["conv1d"]["bias"])
    for name in ("in_proj", "out_proj"):
        if "bias" in p[name]:
            sd[f"{name}.bias"] = np.asarray(p[name]["bias"])
    return {prefix + k: np.ascontiguousarray(v) for k, v in sd.items()}
