"""Imbalance-aware metrics and the EOS paper's generalization gap, as functions on arrays."""
from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of class-i examples predicted as j."""
    idx = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def scores_from_confusion(cm: np.ndarray) -> dict[str, float | np.ndarray]:
    """Every summary metric the suite reports, from one confusion matrix.

    - ``bac``: mean per-class recall over the classes present in ``y_true`` (all of them on a
      test set; a validation split may miss a one-image class).
    - ``gm``: per-class geometric mean, ``prod(recall_c) ** (1/C)`` (imbalanced-learn's default
      ``average='multiclass'``; GAMO's definition).
    - ``gm_macro``: ``sqrt(mean(recall_c) * mean(specificity_c))``, imbalanced-learn's
      ``geometric_mean_score(average='macro')``, the figure the EOS code reports as GM.
    - ``f1_macro``: unweighted mean of per-class F1; ``accuracy``; ``recall`` per class.
    """
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    total = cm.sum()
    recall = _safe_ratio(tp, support)
    precision = _safe_ratio(tp, predicted)
    negatives = total - support
    specificity = _safe_ratio(negatives - (predicted - tp), negatives)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    return {
        "bac": float(recall[support > 0].mean()) if total else 0.0,
        "gm": float(np.prod(recall) ** (1.0 / len(recall))),
        "gm_macro": float(np.sqrt(recall.mean() * specificity.mean())),
        "f1_macro": float(f1.mean()),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "recall": recall,
    }


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    return scores_from_confusion(confusion(y_true, y_pred, num_classes))["bac"]


def generalization_gap(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       test_y: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """EOS paper, Algorithm 1: per class, sum over dimensions of how far the test range of
    each embedding dimension reaches outside the training range (floored at zero); the
    dataset gap is the mean over classes.  A class absent from either set gets NaN and is
    left out of the mean."""
    per_class = np.full(num_classes, np.nan)
    for c in range(num_classes):
        tr, te = train_x[train_y == c], test_x[test_y == c]
        if len(tr) == 0 or len(te) == 0:
            continue
        below = np.maximum(0.0, tr.min(axis=0) - te.min(axis=0))
        above = np.maximum(0.0, te.max(axis=0) - tr.max(axis=0))
        per_class[c] = float((below + above).sum())
    return float(np.nanmean(per_class)), per_class
