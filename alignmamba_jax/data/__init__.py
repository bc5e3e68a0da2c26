"""Data for alignmamba-jax: loaders for the field's files, the synthetic default, missing-modality protocols.

Every loader returns the data contract: {"train","valid","test"} -> split dict with, for each modality m,
m float32 (N, T_m, d_m) and m + "_mask" bool (N, T_m) (True = valid, right padding), "labels" (float32 (N,)
sentiment in [-3, 3] for regression, int32 (N,) for classification) and "ids" str (N,).
"""
from alignmamba_jax.data import missing
from alignmamba_jax.data.features_npz import load_features_npz, save_features_npz
from alignmamba_jax.data.mmsa import load_mmsa_pickle
from alignmamba_jax.data.mult import load_mult_pickle
from alignmamba_jax.data.splits import load_splits

__all__ = ["load_splits", "load_mmsa_pickle", "load_mult_pickle", "load_features_npz", "save_features_npz",
           "missing"]
