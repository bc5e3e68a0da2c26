"""MMSA regression metrics and classification metrics against hand-computed cases."""
import numpy as np
import pytest

from alignmamba_jax.metrics import REGRESSION_KEYS, classification_metrics, regression_metrics


def _pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / np.sqrt((dx ** 2).sum() * (dy ** 2).sum()))


def test_keys_are_mmsa_names():
    out = regression_metrics([0.1, -0.2], [1.0, -1.0])
    assert tuple(out) == REGRESSION_KEYS == ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
                                             "Mult_acc_5", "Mult_acc_7", "MAE", "Corr")
    assert all(isinstance(v, float) for v in out.values())


def test_hand_case_with_a_zero_label():
    preds, labels = [0.5, -1.2, 2.5, 0.0], [0.0, -1.0, 2.6, 1.0]
    out = regression_metrics(np.array(preds), np.array(labels))
    # Has0: >= 0 positive -> preds [T,F,T,T] vs labels [T,F,T,T]
    assert out["Has0_acc_2"] == 1.0 and out["Has0_F1_score"] == 1.0
    # Non0: drop label 0 -> preds>0 [F,T,F] vs labels>0 [F,T,T]: acc 2/3; F1 of both classes 2/3
    assert out["Non0_acc_2"] == 0.6667 and out["Non0_F1_score"] == 0.6667
    # Acc5: clip to [-2,2] then round: [0,-1,2,0] vs [0,-1,2,1]; Acc7: [0,-1,2(2.5 half-even),0] vs [0,-1,3,1]
    assert out["Mult_acc_5"] == 0.75 and out["Mult_acc_7"] == 0.5
    assert out["MAE"] == 0.45
    assert out["Corr"] == round(_pearson(preds, labels), 4)


def test_rounding_ties_half_to_even():
    out = regression_metrics(np.array([-0.5, 0.5, 1.5, 2.5, -2.5]), np.array([0.0, 0.0, 2.0, 2.0, -2.0]))
    assert out["Mult_acc_7"] == 1.0 and out["Mult_acc_5"] == 1.0
    assert out["Has0_acc_2"] == 0.8  # -0.5 < 0 but label 0 counts as positive
    assert out["Non0_acc_2"] == 1.0 and out["Non0_F1_score"] == 1.0
    # weighted F1: positive class F1 6/7 (support 4), negative 2/3 (support 1)
    assert out["Has0_F1_score"] == round((4 * 6 / 7 + 2 / 3) / 5, 4)


def test_zero_predictions_and_labels():
    out = regression_metrics(np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, -1.0]))
    assert out["Has0_acc_2"] == 1.0
    # Non0 keeps labels [1, -1]; a prediction of exactly 0 is negative there
    assert out["Non0_acc_2"] == 0.5 and out["Non0_F1_score"] == round((2 / 3 + 0) / 2, 4)


def test_all_zero_labels_and_constant_predictions():
    out = regression_metrics(np.zeros(3), np.zeros(3))
    assert np.isnan(out["Non0_acc_2"]) and np.isnan(out["Corr"]) and out["Has0_acc_2"] == 1.0


def test_classification_hand_case():
    logits = np.eye(3)[[0, 1, 2, 2]]
    out = classification_metrics(logits, np.array([0, 1, 1, 2]))
    # per-class F1: 1, 2/3, 2/3; supports 1, 2, 1
    assert out == {"accuracy": 0.75, "macro_F1": round(7 / 9, 4), "weighted_F1": 0.75}
    out4 = classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), num_classes=4)
    assert out4["macro_F1"] == round(7 / 12, 4)  # an absent class scores 0 in the macro mean


def test_size_mismatch():
    with pytest.raises(ValueError, match="preds and labels"):
        regression_metrics([0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="preds and labels"):
        classification_metrics([0], [])
