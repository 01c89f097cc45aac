"""Dataset sources: what a registered dataset returns and the defaults it declares."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class DatasetDefaults:
    """The schedule and imbalance profile a dataset runs with unless told otherwise."""

    epochs: int
    batch_size: int
    image_size: int
    ratio: float
    profile: str = "exp"
    hflip: bool = True  # digits and house numbers must not be mirrored
    crop_padding: int = 4


@dataclass
class ImageSet:
    """Images in memory as uint8 ``[N, C, H, W]`` with int64 labels and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("ImageSet images must be uint8 [N, C, H, W]")
        if len(self.images) != len(self.labels):
            raise ValueError("ImageSet needs one label per image")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices], self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class DatasetSource:
    """Base of every registered dataset: ``load`` returns (training pool, balanced test set).

    The training pool is what the long-tailed profile draws from; the test set is fixed and
    balanced.  Subclasses set ``defaults`` and implement ``load``; ``root`` and ``download``
    follow torchvision's conventions.
    """

    defaults: DatasetDefaults

    def __init__(self, root: str | None = None, download: bool = False):
        self.root = root
        self.download = download

    def load(self) -> tuple[ImageSet, ImageSet]:
        raise NotImplementedError

    @property
    def params(self) -> dict:
        """Choices that define this dataset beyond its name (caps, native size); logged."""
        return {}

    @property
    def data_root(self) -> Path:
        """``--data-root``, else ``$BENCHMARK_DATA_ROOT``, else ``./data``."""
        return Path(self.root or os.environ.get("BENCHMARK_DATA_ROOT", "data")).expanduser()
