"""`load_splits(data_config)`: the one entry point training code calls; dispatches on `data_config.name`."""
from __future__ import annotations

from alignmamba_jax.data import validate

NAMES = ("synthetic", "mmsa", "mult", "tfds", "features_npz")


def _get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _synthetic(cfg, task):
    from alignmamba_jax.data import synthetic
    sub = _get(cfg, "synthetic")
    if task == "classification":
        return synthetic.generate_image_text(sub)
    return synthetic.generate_sentiment(sub)


def load_splits(data_config) -> dict:
    """{"train","valid","test"} -> split dict (data contract) for `data_config` (config.data).

    Keys read: name in NAMES, path (file or directory; unused for "synthetic"), modalities, task
    ("regression" | "classification"), num_classes, synthetic (sub-config, see `synthetic.default_config`),
    tfds_name ("mosi" | "mosei", for name="tfds"; data_dir = path, the MMSA pickle in
    path/downloads/manual/, TFDS's default manual_dir), tfds_config ("unaligned" | "aligned"), cache_dir
    (for name="mmsa": convert the pickle once to memory-mappable .npy files there; recommended for MOSEI).
    Only the requested modalities are returned.
    """
    name = _get(data_config, "name", "synthetic")
    task = _get(data_config, "task", "regression")
    default_modalities = ("image", "text") if (name == "synthetic" and task == "classification") else (
        "text", "audio", "vision")
    modalities = tuple(_get(data_config, "modalities", None) or default_modalities)
    path = _get(data_config, "path", None)
    if name not in NAMES:
        raise ValueError(f"data.name: expected one of {NAMES}, found {name!r}")
    if task not in ("regression", "classification"):
        raise ValueError(f"data.task: expected 'regression' or 'classification', found {task!r}")
    if name != "synthetic" and not path:
        raise ValueError(f"data.path: required for data.name={name!r}, found {path!r}")
    if name == "synthetic":
        splits = _synthetic(data_config, task)
    elif name == "mmsa":
        from alignmamba_jax.data.mmsa import load_mmsa_pickle
        splits = load_mmsa_pickle(path, cache_dir=_get(data_config, "cache_dir", None) or None)
    elif name == "mult":
        from alignmamba_jax.data.mult import load_mult_pickle
        splits = load_mult_pickle(path)
    elif name == "tfds":
        from alignmamba_jax.data.tfds_builders import load_tfds_splits
        splits = load_tfds_splits(_get(data_config, "tfds_name", "mosi"), data_dir=path,
                                  config=_get(data_config, "tfds_config", "unaligned"))
    else:
        from alignmamba_jax.data.features_npz import load_features_npz
        splits = load_features_npz(path)
    num_classes = _get(data_config, "num_classes", None)
    return {split: validate.select(arrays, modalities, task, num_classes, where=f"{name}:{path or ''}:{split}")
            for split, arrays in splits.items()}
