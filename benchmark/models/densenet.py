"""CIFAR DenseNet-BC (depth as a parameter) for the architecture study."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UserError
from benchmark.registry import BACKBONES


class BottleneckLayer(nn.Module):
    """BN-ReLU-conv1x1 to 4 * growth channels, BN-ReLU-conv3x3 to growth channels, and the
    new channels appended to the input (the "B" of DenseNet-BC)."""

    def __init__(self, in_planes: int, growth_rate: int):
        super().__init__()
        inner = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 that compresses the channels (the "C"), then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    """Extractor (Huang et al., CIFAR variant): a 3x3 stem of 2 * growth channels, 3 dense
    blocks of ``(depth - 4) / 6`` bottleneck layers with compressing transitions between them,
    a final BN-ReLU and global average pooling; the embedding is non-negative."""

    def __init__(self, depth: int = 100, growth_rate: int = 12, compression: float = 0.5,
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise UserError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
        if growth_rate < 1 or not 0 < compression <= 1:
            raise UserError(f"DenseNet-BC needs growth_rate >= 1 and 0 < compression <= 1, "
                            f"got {growth_rate} and {compression}")
        layers_per_block = (depth - 4) // 6
        planes = 2 * growth_rate
        stages: list[nn.Module] = [nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)]
        self.block_ends: list[int] = []
        for block in range(3):
            for _ in range(layers_per_block):
                stages.append(BottleneckLayer(planes, growth_rate))
                planes += growth_rate
            self.block_ends.append(len(stages) - 1)
            if block < 2:
                compressed = int(planes * compression)
                stages.append(Transition(planes, compressed))
                planes = compressed
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.embedding_dim = planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def stages(self) -> dict[str, nn.Module]:
        """The last layer of each of the 3 dense blocks (transitions halve the resolution
        after the first two)."""
        return {f"stage{i + 1}": self.features[end] for i, end in enumerate(self.block_ends)}

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The maps the embedding pools (after the final BN-ReLU)."""
        return F.relu(self.bn(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.feature_maps(x), 1).flatten(1)


@BACKBONES.register("densenet")
def densenet(in_channels: int = 3, image_size: int = 32, depth: int = 100,
             growth_rate: int = 12) -> DenseNetBC:
    """CIFAR DenseNet-BC (default depth 100, growth 12: 0.77M parameters, 342-d embedding)."""
    return DenseNetBC(depth=depth, growth_rate=growth_rate, in_channels=in_channels)
