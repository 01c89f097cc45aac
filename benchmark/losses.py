"""The loss interface every training loss follows, and plain cross-entropy (the others live in
``baselines/``)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UserError
from benchmark.models import linear_head
from benchmark.registry import LOSSES
from benchmark.train import Schedule

# How a loss weights its classes over training: "none" (uniform), "cb" (class-balanced from
# the first epoch) or "drw" (deferred re-weighting: uniform, class-balanced from the first
# learning-rate decay on).
WEIGHTINGS = ("none", "cb", "drw")


def class_balanced_weights(class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Cui et al.'s weights ``(1 - beta) / (1 - beta ** n_c)``, normalised to sum to C."""
    # A class with no training image is weighted like one with a single image, not infinitely.
    counts = torch.tensor(class_counts, dtype=torch.float64).clamp_min(1)
    weights = (1 - beta) / (1 - beta**counts)
    return (weights * len(counts) / weights.sum()).float()


class Loss(nn.Module):
    """Base of every registered loss.

    A loss factory is called as ``factory(class_counts=..., schedule=..., **params)``:
    ``class_counts`` are the training images per class, ``schedule`` the phase's schedule (so
    deferred re-weighting knows when the first decay comes).  ``on_epoch(epoch)`` runs at the
    start of every epoch; ``make_head(embedding_dim, num_classes)`` builds the classifier head
    this loss expects; ``params`` is what gets logged.

    A subclass computes ``per_sample(logits, targets)`` on float32 logits (bf16 autocast
    output is cast here); the batch loss is their mean, weighted by ``class_weights[target]``
    when the ``weighting`` gives weights, and then divided by the batch's summed weights (as
    ``F.cross_entropy(weight=...)`` does) so that re-weighting moves the balance between classes,
    not the loss scale.
    """

    make_head = staticmethod(linear_head)

    def __init__(self, class_counts: Sequence[int], schedule: Schedule | None = None, *,
                 weighting: str = "none", beta: float = 0.9999):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown weighting '{weighting}'; "
                            f"valid weightings: {', '.join(WEIGHTINGS)}")
        if weighting != "none" and not 0 <= beta < 1:
            raise UserError(f"class-balanced beta must lie in [0, 1), got {beta}")
        if weighting == "drw" and schedule is None:
            raise ValueError("deferred re-weighting needs the schedule to know its first decay")
        self.class_counts = list(class_counts)
        self.schedule = schedule
        self.weighting = weighting
        self.params: dict = {"weighting": weighting}
        if weighting != "none":
            self.params["beta"] = beta
        self.register_buffer("balanced_weights", class_balanced_weights(class_counts, beta),
                             persistent=False)
        self.reweighting = weighting == "cb"

    @property
    def class_weights(self) -> torch.Tensor | None:
        """The per-class weights in force now; ``None`` means uniform."""
        return self.balanced_weights if self.reweighting else None

    def on_epoch(self, epoch: int) -> None:
        if self.weighting == "drw":
            self.reweighting = epoch >= self.schedule.decay_epochs[0]

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.balanced_weights.device != logits.device:
            # Nothing else moves a loss to the device: its buffers follow the logits, once.
            self.to(logits.device)
        losses = self.per_sample(logits.float(), targets)
        if not self.reweighting:
            return losses.mean()
        sample_weights = self.balanced_weights[targets]
        return (sample_weights * losses).sum() / sample_weights.sum()

    def mixed(self, logits: torch.Tensor, targets_a: torch.Tensor, targets_b: torch.Tensor,
              weight_a: torch.Tensor) -> torch.Tensor:
        """The loss of mixed inputs in the label-weight form: per sample
        ``w * L(out, y_a) + (1 - w) * L(out, y_b)`` with ``w = weight_a`` (per sample, so
        Remix's rebalanced weights and mixup's lambda go the same way; with a constant lambda
        and no class weights it is exactly ``lam * loss(out, y_a) + (1 - lam) * loss(out,
        y_b)``).  Class weights in force (class-balanced, DRW) weight each label's term by its
        own class and normalise by the batch's summed weights, as ``forward`` does."""
        if self.balanced_weights.device != logits.device:
            self.to(logits.device)
        logits = logits.float()
        loss_a, loss_b = self.per_sample(logits, targets_a), self.per_sample(logits, targets_b)
        weight_a = weight_a.to(logits.device, torch.float32).expand_as(loss_a)
        if not self.reweighting:
            return (weight_a * loss_a + (1 - weight_a) * loss_b).mean()
        term_a = weight_a * self.balanced_weights[targets_a]
        term_b = (1 - weight_a) * self.balanced_weights[targets_b]
        return (term_a * loss_a + term_b * loss_b).sum() / (term_a + term_b).sum()

    def head_loss(self) -> nn.Module:
        """The loss for retraining the head in phase 3: plain cross-entropy, as the EOS
        reference does; a loss whose head needs another (a scaled cosine head) overrides it."""
        return CrossEntropy(self.class_counts)


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Cross-entropy, unweighted."""

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="none")
