"""The CIFAR-style ResNet family (He et al. 2016, option-A shortcuts): ResNet-20 to ResNet-110."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.models import BlockStages
from benchmark.registry import BACKBONES


class ShortcutA(nn.Module):
    """Option-A shortcut: spatial subsampling plus zero padding of the new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_shortcut = stride != 1 or in_planes != planes
        self.shortcut = ShortcutA(in_planes, planes, stride) if needs_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(BlockStages, nn.Module):
    """Extractor: 3 stages of ``(depth - 2) / 6`` basic blocks (16/32/64 channels, strides
    1/2/2), global average pooling; the embedding is 64-d and non-negative (after ReLU)."""

    def __init__(self, depth: int = 32, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, stride in enumerate((1, 2, 2)):
            planes = width * 2**stage
            for b in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.blocks_per_stage = blocks
        self.embedding_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The maps the embedding pools: ``[N, embedding_dim, H, W]``."""
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.feature_maps(x), 1).flatten(1)


def _register_depth(depth: int) -> None:
    def factory(in_channels: int = 3, image_size: int = 32) -> CifarResNet:
        return CifarResNet(depth=depth, in_channels=in_channels)

    factory.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} blocks per stage, 64-d embedding)"
    BACKBONES.register(f"resnet{depth}")(factory)


for _depth in (20, 32, 44, 56, 110):
    _register_depth(_depth)
