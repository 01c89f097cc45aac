"""Cost-sensitive losses: focal, ASL, LDAM, class-balanced weights and deferred re-weighting."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UserError
from benchmark.losses import CrossEntropy, Loss
from benchmark.registry import LOSSES
from benchmark.train import Schedule


@LOSSES.register("focal")
class FocalLoss(Loss):
    """Focal loss (Lin et al.): cross-entropy times (1 - p_true) ** gamma; gamma 2 as in EOS."""

    def __init__(self, class_counts: Sequence[int], schedule: Schedule | None = None, *,
                 gamma: float = 2.0, **weighting):
        super().__init__(class_counts, schedule, **weighting)
        if gamma < 0:
            raise UserError(f"focal gamma must be non-negative, got {gamma}")
        self.gamma = gamma
        self.params["gamma"] = gamma

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets, reduction="none")
        # 1 - p_true as -expm1(-ce): exact for confident samples, where 1 - exp(-ce) cancels.
        return (-torch.expm1(-ce)) ** self.gamma * ce


@LOSSES.register("asl")
class AsymmetricLoss(Loss):
    """Single-label ASL (Ridnik et al.): (1 - p) ** 0 on the true class, p ** 4 on others, eps 0.1.

    Each class's log-probability is weighted by its focusing factor (gamma_pos on the true class,
    gamma_neg on the others) and by the one-hot target smoothed by eps."""

    def __init__(self, class_counts: Sequence[int], schedule: Schedule | None = None, *,
                 gamma_pos: float = 0.0, gamma_neg: float = 4.0, eps: float = 0.1, **weighting):
        super().__init__(class_counts, schedule, **weighting)
        if gamma_pos < 0 or gamma_neg < 0 or not 0 <= eps < 1:
            raise UserError(f"ASL needs gamma_pos, gamma_neg >= 0 and 0 <= eps < 1, got "
                            f"{gamma_pos}, {gamma_neg} and {eps}")
        self.gamma_pos, self.gamma_neg, self.eps = gamma_pos, gamma_neg, eps
        self.params.update(gamma_pos=gamma_pos, gamma_neg=gamma_neg, eps=eps)

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        is_target = F.one_hot(targets, num_classes).bool()
        # The weights stay in the graph, as in ASL's reference, so they shape the gradient too.
        focusing = torch.where(is_target, (1 - p) ** self.gamma_pos, p**self.gamma_neg)
        smoothed = torch.where(is_target, 1 - self.eps + self.eps / num_classes,
                               self.eps / num_classes)
        return -(smoothed * focusing * log_p).sum(dim=1)


class CosineHead(nn.Module):
    """LDAM's normalised classifier: logits are the cosines between the embedding and each
    class's weight vector, in [-1, 1]; the loss supplies the scale."""

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's; only directions matter

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # bf16 resolves cosines near 1 only to about 0.004, 0.1 in logit units once scaled by
        # s = 30; the head is one small matmul, so it runs in float32 under autocast too.
        with torch.autocast(embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.float(), dim=1),
                            F.normalize(self.weight, dim=1))


@LOSSES.register("ldam")
class LDAMLoss(Loss):
    """LDAM (Cao et al.): true-class margin 0.5 * (n_min / n_j) ** 0.25, scale 30, cosine head.

    The margin ``max_m * (n_min / n_j) ** 0.25`` comes off the true class's cosine only; the
    cosines are multiplied by s and go into cross-entropy.

    Phase 3 (``head_loss``) retrains the cosine head with the same scale s but no margins and no
    class weights: the resampled embeddings it trains on are balanced, so the count-based terms
    no longer apply, and plain cross-entropy on unscaled cosines (the base default) could not
    push any probability far above 1 / C.  (The EOS reference retrains a plain linear head.)
    """

    make_head = CosineHead

    def __init__(self, class_counts: Sequence[int], schedule: Schedule | None = None, *,
                 max_m: float = 0.5, s: float = 30.0, **weighting):
        super().__init__(class_counts, schedule, **weighting)
        if max_m < 0 or s <= 0:
            raise UserError(f"LDAM needs max_m >= 0 and s > 0, got {max_m} and {s}")
        self.max_m, self.s = max_m, s
        self.params.update(max_m=max_m, s=s)
        inverse_fourth_roots = torch.tensor(class_counts, dtype=torch.float64).clamp_min(1) ** -0.25
        margins = inverse_fourth_roots * (max_m / inverse_fourth_roots.max())
        self.register_buffer("margins", margins.float(), persistent=False)

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        true_class_margin = self.margins[targets, None] * F.one_hot(targets, logits.shape[1])
        return F.cross_entropy(self.s * (logits - true_class_margin), targets, reduction="none")

    def head_loss(self) -> nn.Module:
        return LDAMLoss(self.class_counts, max_m=0.0, s=self.s)


def register_weighted(name: str, loss_class: type[Loss], weighting: str, description: str) -> None:
    """Register ``loss_class`` under ``name`` with its class weighting fixed to ``weighting``."""

    def factory(class_counts: Sequence[int], schedule: Schedule | None = None, **params) -> Loss:
        if "weighting" in params:
            raise UserError(f"loss '{name}' fixes weighting '{weighting}'; "
                            f"pass weighting to the unweighted loss instead")
        return loss_class(class_counts, schedule, weighting=weighting, **params)

    LOSSES.register(name, description)(factory)


CLASS_BALANCED = "with class-balanced weights (Cui et al., beta 0.9999)"
DEFERRED = "class-balanced weights (beta 0.9999) from the first lr decay on (DRW)"
for _name, _loss, _weighting, _description in (
        ("cb-ce", CrossEntropy, "cb", f"Cross-entropy {CLASS_BALANCED}"),
        ("cb-focal", FocalLoss, "cb", f"Focal loss {CLASS_BALANCED}"),
        ("ce-drw", CrossEntropy, "drw", f"Cross-entropy, {DEFERRED}"),
        ("focal-drw", FocalLoss, "drw", f"Focal loss, {DEFERRED}"),
        ("asl-drw", AsymmetricLoss, "drw", f"Single-label ASL, {DEFERRED}"),
        ("ldam-drw", LDAMLoss, "drw", f"LDAM, {DEFERRED}")):
    register_weighted(_name, _loss, _weighting, _description)
