"""Evaluation metrics: MMSA's MOSI / MOSEI regression metrics (metricsTop.__eval_mosei_regression, same key
names, same definitions, rounded to 4 decimals as MMSA does) and classification metrics for the image tasks.
NumPy in, dict of Python floats out; no scikit-learn (its accuracy / weighted F1 are re-derived here)."""
from __future__ import annotations

import warnings

import numpy as np

REGRESSION_KEYS = ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7",
                   "MAE", "Corr")
CLASSIFICATION_KEYS = ("accuracy", "macro_F1", "weighted_F1")


def _f1_per_class(y_true, y_pred, labels):
    f1 = []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return np.asarray(f1, np.float64)


def weighted_f1(y_true, y_pred):
    """scikit-learn's f1_score(average='weighted'): per-class F1 over the labels in either array, weighted by
    the class's support in y_true."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.union1d(y_true, y_pred)
    support = np.array([np.sum(y_true == c) for c in labels], np.float64)
    if support.sum() == 0:
        return 0.0
    return float(np.sum(_f1_per_class(y_true, y_pred, labels) * support) / support.sum())


def _multiclass_acc(y_pred, y_true):
    # np.round rounds half to even (MMSA's definition: 2.5 -> 2, -0.5 -> -0)
    return float(np.sum(np.round(y_pred) == np.round(y_true)) / float(len(y_true)))


def regression_metrics(preds, labels) -> dict:
    """MMSA metrics for sentiment in [-3, 3]: Has0_* treat label >= 0 as positive; Non0_* drop samples whose
    label is exactly 0 and treat > 0 as positive; F1 is weighted; Mult_acc_k rounds after clipping to
    [-2, 2] (k = 5) or [-3, 3] (k = 7); Corr is Pearson's r (nan for constant inputs, as MMSA).

    preds, labels: array-likes of the same non-empty size (flattened), e.g. (N,). Returns {key: float rounded to
    4 decimals} for the keys of `REGRESSION_KEYS`; Non0_* are nan where every label is 0. Unequal or empty sizes
    raise ValueError."""
    p = np.asarray(preds, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"preds and labels: expected equal non-empty sizes, found {p.shape} and {y.shape}")
    non0 = y != 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        corr = float(np.corrcoef(p, y)[0][1])
    out = {
        "Has0_acc_2": float(np.mean((p >= 0) == (y >= 0))),
        "Has0_F1_score": weighted_f1(y >= 0, p >= 0),
        "Non0_acc_2": float(np.mean((p[non0] > 0) == (y[non0] > 0))) if non0.any() else float("nan"),
        "Non0_F1_score": weighted_f1(y[non0] > 0, p[non0] > 0) if non0.any() else float("nan"),
        "Mult_acc_5": _multiclass_acc(np.clip(p, -2.0, 2.0), np.clip(y, -2.0, 2.0)),
        "Mult_acc_7": _multiclass_acc(np.clip(p, -3.0, 3.0), np.clip(y, -3.0, 3.0)),
        "MAE": float(np.mean(np.abs(p - y))),
        "Corr": corr,
    }
    return {k: round(v, 4) for k, v in out.items()}


def classification_metrics(preds, labels, num_classes=None) -> dict:
    """accuracy, macro_F1 (mean per-class F1 over all `num_classes` classes, or the classes seen in either
    array), weighted_F1 (scikit-learn's weighted average).

    preds: class indices (N,) or logits (N, C); labels: class indices (N,). Returns {key: float} for the keys of
    `CLASSIFICATION_KEYS`."""
    p = np.asarray(preds)
    if p.ndim == 2:
        num_classes = num_classes or p.shape[1]
        p = p.argmax(-1)
    y = np.asarray(labels).reshape(-1)
    p = p.reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"preds and labels: expected equal non-empty sizes, found {p.shape} and {y.shape}")
    classes = np.arange(num_classes) if num_classes else np.union1d(y, p)
    return {
        "accuracy": round(float(np.mean(p == y)), 4),
        "macro_F1": round(float(np.mean(_f1_per_class(y, p, classes))), 4),
        "weighted_F1": round(weighted_f1(y, p), 4),
    }
