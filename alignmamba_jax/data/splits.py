"""`load_splits(data_config)`: the one entry point training code calls; dispatches on `data_config.name`.

Every loader's result goes through the same checks here, before any compilation: `data.path` is the kind of
path the loader reads (`check_path`), each split meets the data contract (`validate.select`) and the splits
agree with each other (`validate.check_splits`). Every failure is a `UserError` naming the file, split, key,
expected and found value.
"""
from __future__ import annotations

import os

from alignmamba_jax.data import validate
from alignmamba_jax.errors import UserError

NAMES = ("synthetic", "mmsa", "mult", "tfds", "features_npz")
# what data.path names, per loader: ("file" | "directory", description)
PATH_KINDS = {
    "mmsa": ("file", "an MMSA feature pickle such as MOSI/Processed/unaligned_50.pkl"),
    "mult": ("file", "a MulT pickle such as mosi_data_noalign.pkl"),
    "tfds": ("directory", "a TFDS data_dir directory (MMSA's unaligned_50.pkl or aligned_50.pkl in "
                          "<data_dir>/downloads/manual/ until the dataset is built)"),
    "features_npz": ("directory", "a directory holding train.npz, valid.npz and test.npz"),
}


def _get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _synthetic(cfg, task):
    from alignmamba_jax.data import synthetic
    sub = _get(cfg, "synthetic")
    if task == "classification":
        return synthetic.generate_image_text(sub)
    return synthetic.generate_sentiment(sub)


def check_path(name, path):
    """Raises unless `path` exists and is a file or a directory, as the loader `name` expects."""
    kind, expected = PATH_KINDS[name]
    expects = f"data.name={name!r} expects {expected}"
    if not os.path.exists(path):
        raise UserError(f"data.path={path!r} does not exist; {expects} (MMSA pickles: see the README, "
                        f"\"Training on CMU-MOSI / CMU-MOSEI\")")
    if kind == "file" and os.path.isdir(path):
        pickles = sorted(f for f in os.listdir(path) if f.endswith(".pkl"))
        raise UserError(f"data.path={path!r} is a directory; {expects}"
                        + (f" (pickles in that directory: {', '.join(pickles)})" if pickles else ""))
    if kind == "directory" and not os.path.isdir(path):
        raise UserError(f"data.path={path!r} is a file; {expects}")


def load_splits(data_config) -> dict:
    """{"train","valid","test"} -> split dict (data contract) for `data_config` (config.data).

    Keys read: name in NAMES, path (file or directory, see PATH_KINDS; unused for "synthetic"), modalities,
    task ("regression" | "classification"), num_classes, synthetic (sub-config, see `config.default_synthetic_config`),
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
        raise UserError(f"data.name: expected one of {NAMES}, found {name!r}")
    if task not in ("regression", "classification"):
        raise UserError(f"data.task: expected 'regression' or 'classification', found {task!r}")
    if name != "synthetic":
        if not path:
            raise UserError(f"data.path: required for data.name={name!r}, found {path!r}")
        check_path(name, path)
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
    where = f"{name}:{path or ''}"
    splits = {split: validate.select(arrays, modalities, task, num_classes, where=f"{where}:{split}")
              for split, arrays in splits.items()}
    validate.check_splits(splits, modalities, where)
    return splits
