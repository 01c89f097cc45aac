"""Models as an extractor (images -> pooled embedding) plus a head (embedding -> logits)."""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """An extractor with an ``embedding_dim`` attribute followed by a head on its embedding."""

    def __init__(self, extractor: nn.Module, head: nn.Module):
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(images))


def linear_head(embedding_dim: int, num_classes: int) -> nn.Module:
    """The plain linear classifier every loss uses unless it asks for another head."""
    head = nn.Linear(embedding_dim, num_classes)
    nn.init.kaiming_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return head
