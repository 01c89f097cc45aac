"""WideResNet-28 (widen factor as a parameter) for the architecture study."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UserError
from benchmark.models import BlockStages
from benchmark.registry import BACKBONES

# The EOS paper's WideResNet has "approx. 5X" the parameters of its ResNet-56 (0.85M) and
# DenseNet (DenseNet-BC-100: 0.77M), about 4M.  WRN-28-3 (3.3M, 4x) is the integer widening
# nearest that; WRN-28-4 (5.8M) would be 7x.
DEFAULT_WIDEN_FACTOR = 3


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice (Zagoruyko & Komodakis); a 1x1 convolution on the shared
    pre-activation when the shape changes, as in the WRN paper."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.projection = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                           if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        shortcut = x if self.projection is None else self.projection(activated)
        return out + shortcut


class WideResNet(BlockStages, nn.Module):
    """Extractor: a 16-channel stem, 3 stages of ``(depth - 4) / 6`` pre-activation blocks with
    16k/32k/64k channels (strides 1/2/2), a final BN-ReLU and global average pooling; the
    embedding is 64k-d and non-negative."""

    def __init__(self, depth: int = 28, widen_factor: int = DEFAULT_WIDEN_FACTOR,
                 in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise UserError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise UserError(f"WideResNet widen_factor must be at least 1, got {widen_factor}")
        blocks = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for stage, stride in enumerate((1, 2, 2)):
            planes = 16 * widen_factor * 2**stage
            for b in range(blocks):
                layers.append(PreActBlock(in_planes, planes, stride if b == 0 else 1, dropout))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.blocks_per_stage = blocks
        self.bn = nn.BatchNorm2d(in_planes)
        self.embedding_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The maps the embedding pools (after the final BN-ReLU)."""
        return F.relu(self.bn(self.layers(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.feature_maps(x), 1).flatten(1)


@BACKBONES.register("wrn28")
def wrn28(in_channels: int = 3, image_size: int = 32, widen_factor: int = DEFAULT_WIDEN_FACTOR,
          dropout: float = 0.0) -> WideResNet:
    """WideResNet-28-k (k = widen_factor, default 3: 3.3M parameters, 192-d embedding)."""
    return WideResNet(depth=28, widen_factor=widen_factor, in_channels=in_channels,
                      dropout=dropout)
