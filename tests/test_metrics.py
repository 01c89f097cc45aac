"""Metrics against hand-computed values and against imbalanced-learn / scikit-learn."""
import numpy as np
import pytest
from imblearn.metrics import geometric_mean_score
from sklearn.metrics import balanced_accuracy_score, f1_score

from benchmark.metrics import confusion, generalization_gap, scores_from_confusion

# 3 classes, rows = true, columns = predicted.
CM = np.array([[8, 2, 0],
               [1, 3, 1],
               [0, 0, 5]])


def test_scores_match_hand_computation():
    s = scores_from_confusion(CM)
    recall = [8 / 10, 3 / 5, 5 / 5]
    assert s["recall"] == pytest.approx(recall)
    assert s["bac"] == pytest.approx(np.mean(recall))  # 0.8
    assert s["gm"] == pytest.approx((0.8 * 0.6 * 1.0) ** (1 / 3))
    # specificity: class 0: TN = 10 - 1 = 9 of 10 negatives; class 1: 13 of 15; class 2: 14 of 15
    specificity = [9 / 10, 13 / 15, 14 / 15]
    assert s["gm_macro"] == pytest.approx(np.sqrt(np.mean(recall) * np.mean(specificity)))
    precision = [8 / 9, 3 / 5, 5 / 6]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert s["f1_macro"] == pytest.approx(np.mean(f1))
    assert s["accuracy"] == pytest.approx(16 / 20)


def test_scores_agree_with_reference_libraries():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))
    s = scores_from_confusion(confusion(y_true, y_pred, 4))
    assert s["bac"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert s["gm"] == pytest.approx(geometric_mean_score(y_true, y_pred))
    assert s["gm_macro"] == pytest.approx(geometric_mean_score(y_true, y_pred, average="macro"))
    assert s["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_bac_ignores_classes_absent_from_truth():
    # A validation split may miss a one-image class: BAC averages the classes present.
    s = scores_from_confusion(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    assert s["bac"] == pytest.approx((0.75 + 1.0) / 2)


def test_generalization_gap_by_hand():
    train_x = np.array([[0.0, 1.0], [2.0, 3.0], [5.0, 5.0]])
    train_y = np.array([0, 0, 1])
    test_x = np.array([[-1.0, 2.0], [1.0, 4.5], [5.0, 5.0]])
    test_y = np.array([0, 0, 1])
    gap, per_class = generalization_gap(train_x, train_y, test_x, test_y, 2)
    # class 0: dim 0 reaches 1 below the train min; dim 1 reaches 1.5 above the train max.
    assert per_class.tolist() == pytest.approx([2.5, 0.0])
    assert gap == pytest.approx(1.25)
