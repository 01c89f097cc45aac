"""The diagnostics' measures on arrays: long-tail groups, top-K coverage, norms, overlaps.

Definitions follow METHODS.md ("Generalization gap", "Embedding analysis"):

- FE are the pooled embeddings; a head is used in its linear form ``logit = F @ W.T + b``
  (``head_linear_form``), where F is FE itself for an affine head (a linear layer, or one a
  method wrapped or rescaled) and FE / |FE| for a cosine head (whose W rows are then unit
  vectors and b is zero).  CE of class c = ``F * W[c]``
  element-wise, so that ``logit_c = sum(CE_c) + b_c``.
- Top-K coverage: an instance is covered at K when the K largest CE of its predicted class,
  plus that class's bias, exceed the runner-up logit.  The bias is counted so that K = H (every
  feature) covers every instance; the paper's heads sum CE alone, which differs only by b.
- Class groups of a test set follow the prediction (the paper's "reference class"): the true
  positives of c are c's images predicted c, its false positives other classes' images
  predicted c.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Long-tail groups (Kang et al., Liu et al.): many-shot above 100 training images, few-shot
# below 20, at the scale of a largest class of 500 (CIFAR-100-LT).  Smaller datasets scale both
# thresholds by n_max / 500 (see ``longtail_thresholds``).
MANY_ABOVE, FEW_BELOW, REFERENCE_MAX = 100, 20, 500
GROUPS = ("many", "medium", "few")
COVERAGE_KS = (2, 3, 5, 7)
# The paper's "class top-K members": the 10 features most often among an instance's 10 largest.
IDENTITY_MEMBERS = 10


# Long-tail groups ------------------------------------------------------------------------------
def longtail_thresholds(class_counts: list[int] | np.ndarray) -> tuple[float, float]:
    """``(many_above, few_below)`` for these training counts: the literature's 100 and 20
    where the largest class has at least 500 images (CIFAR-10-LT, CIFAR-100-LT, ImageNet-LT use
    them unscaled), else both times ``n_max / 500``, so that a small dataset splits its range
    as CIFAR-100-LT splits 500..5 (digits with 108 images in its largest class: 21.6 and 4.32)."""
    scale = min(1.0, max(class_counts) / REFERENCE_MAX)
    return MANY_ABOVE * scale, FEW_BELOW * scale


def longtail_groups(class_counts: list[int] | np.ndarray) -> np.ndarray:
    """Per class ``"many"`` (more than ``many_above`` training images), ``"few"`` (fewer than
    ``few_below``) or ``"medium"`` (between, both ends included)."""
    counts = np.asarray(class_counts, dtype=float)
    many_above, few_below = longtail_thresholds(counts)
    return np.where(counts > many_above, "many", np.where(counts < few_below, "few", "medium"))


def group_accuracy(cm: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Accuracy over the test images of each group's classes (``cm[true, predicted]``);
    groups without a class are left out."""
    cm = np.asarray(cm, dtype=float)
    result = {}
    for group in GROUPS:
        rows = groups == group
        if rows.any() and cm[rows].sum() > 0:
            result[group] = float(np.diag(cm)[rows].sum() / cm[rows].sum())
    return result


# The head's linear form ------------------------------------------------------------------------
@dataclass
class LinearForm:
    """A head as ``logits = features(FE) @ weight.T + bias``."""

    weight: np.ndarray  # [C, H]
    bias: np.ndarray  # [C]
    normalise: bool  # features are FE / |FE| (a cosine head)

    def features(self, fe: np.ndarray) -> np.ndarray:
        if not self.normalise:
            return fe
        return fe / np.maximum(np.linalg.norm(fe, axis=1, keepdims=True), 1e-12)

    def logits(self, fe: np.ndarray) -> np.ndarray:
        return self.features(fe) @ self.weight.T + self.bias


def head_linear_form(head, probe: np.ndarray) -> LinearForm | None:
    """The head's linear form, read off its outputs on the zero vector and the unit vectors,
    and checked against its outputs on ``probe`` embeddings: any affine head (a linear layer,
    a wrapper that scales one); else a cosine head (normalised embeddings and ``weight``
    rows, no bias); ``None`` for any other head, whose CE are then undefined."""
    import torch

    parameter = next(head.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dim = probe.shape[1]
    was_training = head.training
    head.eval()
    with torch.no_grad():
        out = head(torch.as_tensor(probe, dtype=torch.float32, device=device)).float().cpu()
        basis = head(torch.cat([torch.zeros(1, dim), torch.eye(dim)]).to(device)).float().cpu()
    head.train(was_training)
    out, basis = out.numpy().astype(float), basis.numpy().astype(float)
    tolerance = 1e-4 * max(1.0, float(np.abs(out).max()))
    candidates = [LinearForm((basis[1:] - basis[0]).T, basis[0], False)]
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] == dim:
        w = weight.detach().float().cpu().numpy().astype(float)
        candidates.append(LinearForm(w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True),
                                                    1e-12), np.zeros(len(w)), True))
    for form in candidates:
        if np.allclose(form.logits(probe.astype(float)), out, rtol=1e-4, atol=tolerance):
            return form
    return None


# Top-K coverage --------------------------------------------------------------------------------
def runner_up(logits: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per row, the largest logit of any class but the predicted one."""
    others = logits.astype(float, copy=True)
    others[np.arange(len(others)), predicted] = -np.inf
    return others.max(axis=1)


def topk_covered(features: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                 ks=COVERAGE_KS, predicted: np.ndarray | None = None) -> np.ndarray:
    """``[N, len(ks)]`` bool: whether the K largest CE of each row's predicted class plus its
    bias exceed the runner-up logit (K clamped to the features).  ``predicted`` defaults to
    the argmax of the logits; the model's own predictions may be given instead (they differ
    only on float ties, and such a row is then simply not covered)."""
    logits = features @ weight.T + bias
    if predicted is None:
        predicted = logits.argmax(axis=1)
    ce = features * weight[predicted]  # the CE of the predicted class only: [N, H]
    largest_first = -np.sort(-ce, axis=1)
    partial = np.cumsum(largest_first, axis=1) + bias[predicted][:, None]
    columns = [min(k, features.shape[1]) - 1 for k in ks]
    return partial[:, columns] > runner_up(logits, predicted)[:, None]


def coverage_by_class(covered: np.ndarray, classes: np.ndarray,
                      num_classes: int) -> np.ndarray:
    """``[C, len(ks)]`` share of each class's rows covered (NaN for a class without rows)."""
    return class_means(np.asarray(covered, dtype=float), classes, num_classes)


# Weights and mean magnitudes --------------------------------------------------------------------
def weight_norms(weight: np.ndarray) -> np.ndarray:
    """The Euclidean norm of every class's weight row."""
    return np.linalg.norm(np.asarray(weight, dtype=float), axis=1)


def class_means(x: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, H]`` mean row of each class (NaN rows for classes without any)."""
    means = np.full((num_classes, x.shape[1]), np.nan)
    for c in range(num_classes):
        rows = classes == c
        if rows.any():
            means[c] = x[rows].mean(axis=0)
    return means


def row_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row the Euclidean norm of ``a - b`` (NaN where either row is missing)."""
    return np.sqrt(((np.asarray(a, float) - np.asarray(b, float)) ** 2).sum(axis=1))


def frobenius_of_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The Frobenius norm of ``a - b`` over the rows both hold (rows with NaN left out): the
    paper's ``FB[mu(Train_FE) - mu(Test_TP_FE)]`` over the classes both sets have."""
    distances = row_distances(a, b)
    present = np.isfinite(distances)
    return float(np.sqrt((distances[present] ** 2).sum())) if present.any() else float("nan")


# Feature identities ----------------------------------------------------------------------------
def class_top_members(values: np.ndarray, classes: np.ndarray, num_classes: int,
                      members: int = IDENTITY_MEMBERS) -> list[np.ndarray | None]:
    """Per class, its "class top-K members": the ``members`` feature indices that most often
    rank among a row's ``members`` largest values (ties: the lower index); ``None`` for a
    class without rows."""
    m = min(members, values.shape[1])
    # Stable sort of the negated values: equal values rank by index, so the result is exact.
    top = np.argsort(-values, axis=1, kind="stable")[:, :m]
    result: list[np.ndarray | None] = []
    for c in range(num_classes):
        rows = top[classes == c]
        if not len(rows):
            result.append(None)
            continue
        frequency = np.bincount(rows.ravel(), minlength=values.shape[1])
        result.append(np.argsort(-frequency, kind="stable")[:m])
    return result


def identity_overlap(a: list[np.ndarray | None], b: list[np.ndarray | None]) -> np.ndarray:
    """Per class the share of ``a``'s members that ``b`` also holds (NaN where either is
    missing)."""
    return np.array([len(set(x.tolist()) & set(y.tolist())) / len(x)
                     if x is not None and y is not None else np.nan for x, y in zip(a, b)])


# EOS's record ----------------------------------------------------------------------------------
def eos_record(y: np.ndarray, base: np.ndarray, partner: np.ndarray, step: np.ndarray,
               fallback: list, num_classes: int) -> dict[str, np.ndarray]:
    """Per class, from an EOS sampler's attributes over the labels ``y`` it was fitted on:
    ``synthetic`` points made, ``enemy_share`` of their partners of another class (NaN where
    none was made), ``step_mean``, ``bases`` (distinct base points used) and ``fallback``
    (1 where the fallback rule served the class)."""
    y = np.asarray(y)
    made = y[base] if len(base) else np.empty(0, dtype=y.dtype)
    record = {name: np.full(num_classes, np.nan) for name in ("enemy_share", "step_mean")}
    record["synthetic"] = np.bincount(made, minlength=num_classes).astype(float)
    record["bases"] = np.zeros(num_classes)
    for c in range(num_classes):
        rows = made == c
        if rows.any():
            record["enemy_share"][c] = float((y[partner[rows]] != c).mean())
            record["step_mean"][c] = float(step[rows].mean())
            record["bases"][c] = len(np.unique(base[rows]))
    record["fallback"] = np.isin(np.arange(num_classes), np.asarray(fallback, dtype=int)
                                 ).astype(float)
    return record
