"""The loss interface every training loss follows, and plain cross-entropy (the others live in
``baselines/``)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.models import linear_head
from benchmark.registry import LOSSES
from benchmark.train import Schedule


class Loss(nn.Module):
    """Base of every registered loss.

    A loss factory is called as ``factory(class_counts=..., schedule=..., **params)``:
    ``class_counts`` are the training images per class, ``schedule`` the phase's schedule (so
    deferred re-weighting knows when the first decay comes).  ``on_epoch(epoch)`` runs at the
    start of every epoch; ``make_head(embedding_dim, num_classes)`` builds the classifier head
    this loss expects; ``params`` is what gets logged.
    """

    make_head = staticmethod(linear_head)

    def __init__(self, class_counts: Sequence[int], schedule: Schedule | None = None):
        super().__init__()
        self.class_counts = list(class_counts)
        self.schedule = schedule
        self.params: dict = {}

    def on_epoch(self, epoch: int) -> None:
        pass

    def head_loss(self) -> nn.Module:
        """The loss for retraining the head in phase 3: plain cross-entropy, as the EOS
        reference does; a loss whose head needs another (a scaled cosine head) overrides it."""
        return CrossEntropy(self.class_counts)


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Cross-entropy, unweighted."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)
