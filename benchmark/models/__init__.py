"""Models as an extractor (images -> pooled embedding) plus a head (embedding -> logits)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from benchmark.errors import UserError


class Classifier(nn.Module):
    """An extractor with an ``embedding_dim`` attribute followed by a head on its embedding."""

    def __init__(self, extractor: nn.Module, head: nn.Module):
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(images))


class ImageClassifier(nn.Module):
    """The final model as served: uint8 images ``[N, C, H, W]`` in, class logits out; the
    per-channel normalisation of training is part of it."""

    def __init__(self, extractor: nn.Module, head: nn.Module, mean: torch.Tensor,
                 std: torch.Tensor):
        super().__init__()
        self.extractor, self.head = extractor, head
        self.register_buffer("mean", mean.float().reshape(1, -1, 1, 1))
        self.register_buffer("std", std.float().reshape(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std
        return self.head(self.extractor(x))


def linear_head(embedding_dim: int, num_classes: int) -> nn.Module:
    """The plain linear classifier every loss uses unless it asks for another head."""
    head = nn.Linear(embedding_dim, num_classes)
    nn.init.kaiming_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class BlockStages:
    """``stages()`` for an extractor whose ``layers`` hold ``blocks_per_stage`` blocks for each
    of its 3 stages (CIFAR ResNets, WideResNets)."""

    def stages(self) -> dict[str, nn.Module]:
        """The last block of each stage (the second and third start by halving the
        resolution)."""
        n = self.blocks_per_stage
        return {f"stage{i + 1}": self.layers[(i + 1) * n - 1] for i in range(3)}


def backbone_stages(extractor: nn.Module) -> dict[str, nn.Module]:
    """The named stages of an extractor, in order: ``{name: module whose output ends it}``.

    Backbones expose them with a ``stages()`` method; one without (a ``timm:`` model) cannot
    take a module inserted at a stage."""
    if not hasattr(extractor, "stages"):
        raise UserError(f"backbone {type(extractor).__name__} exposes no named stages, so no "
                        f"module can be inserted into it; use a resnet, wrn28 or densenet")
    return extractor.stages()


def insert_after_stage(model: Classifier, stage: str, module: nn.Module,
                       name: str) -> RemovableHandle:
    """Apply ``module`` to the output of the extractor's ``stage``; it becomes a submodule of
    ``model`` (``name``), so it trains and is saved with it.  ``handle.remove()`` takes it out
    of the forward pass again (e.g. a training-only module, before evaluation)."""
    stages = backbone_stages(model.extractor)
    if stage not in stages:
        raise UserError(f"backbone {type(model.extractor).__name__} has no stage '{stage}'; "
                        f"its stages: {', '.join(stages)}")
    model.add_module(name, module)
    return stages[stage].register_forward_hook(lambda _module, _inputs, output: module(output))
