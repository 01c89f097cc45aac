"""A generated dataset of noise images (torchvision's FakeData), to measure throughput anywhere."""
from __future__ import annotations

import dataclasses
from importlib import metadata

import torch

from benchmark.data import DatasetDefaults, DatasetSource, ImageSet
from benchmark.errors import UserError
from benchmark.registry import DATASETS

# torch seeds its CPU generator with the low 32 bits only: ``seed`` moves FakeData's seeds by
# this many images, so 256 seeds share the range without meeting below 16.7M images each.
SEED_STRIDE = 1 << 24
SEEDS = 256


@DATASETS.register("fake")
class Fake(DatasetSource):
    """Noise images of torchvision's FakeData, CIFAR-shaped: 10 classes, 5,000 training and
    1,000 test images per class, 32x32 colour; no download.

    Image ``i`` and its label are FakeData's (``random_offset = seed * 2**24``, seed 0 to
    255; torch keeps 32 bits of a seed): torch's
    generator seeded with ``i + random_offset`` draws a standard normal image, then a label
    uniformly; the uint8 image is what FakeData's PIL conversion makes of it
    (``x.mul(255).byte()``), computed here without the per-image PIL round trip.  Images are
    taken in index order until every class has its count: a class's first
    ``train_per_class`` images train, its next ``test_per_class`` test.  Same parameters,
    same images, on the same platform; the labels carry no signal, so only throughput means
    anything.  ``identity`` names the parameters (the seed among them) and the torch and
    torchvision versions that generate the images.
    """

    defaults = DatasetDefaults(epochs=200, batch_size=128, image_size=32, ratio=100,
                               hflip=True, crop_padding=4)

    def __init__(self, root: str | None = None, download: bool = False, *, classes: int = 10,
                 train_per_class: int = 5000, test_per_class: int = 1000,
                 image_size: int = 32, channels: int = 3, seed: int = 0):
        super().__init__(root, download)
        sizes = {"classes": classes, "train_per_class": train_per_class,
                 "test_per_class": test_per_class, "image_size": image_size,
                 "channels": channels}
        bad = [f"{name}={value}" for name, value in sizes.items()
               if isinstance(value, bool) or not isinstance(value, int) or value < 1]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEEDS:
            bad.append(f"seed={seed}")
        if bad:
            raise UserError(f"dataset 'fake' needs positive integer sizes and a seed from 0 "
                            f"to {SEEDS - 1}, got {', '.join(bad)}")
        self.classes, self.train_per_class, self.test_per_class = (
            classes, train_per_class, test_per_class)
        self.image_size, self.channels, self.seed = image_size, channels, seed
        if image_size != type(self).defaults.image_size:
            self.defaults = dataclasses.replace(type(self).defaults, image_size=image_size)

    @property
    def params(self) -> dict:
        return {"classes": self.classes, "train_per_class": self.train_per_class,
                "test_per_class": self.test_per_class, "image_size": self.image_size,
                "channels": self.channels, "seed": self.seed}

    def data_fingerprint(self) -> dict:
        return {"generator": "torchvision.datasets.FakeData",
                "torchvision": metadata.version("torchvision"), "torch": torch.__version__}

    def load(self) -> tuple[ImageSet, ImageSet]:
        per_class = self.train_per_class + self.test_per_class
        shape = (self.channels, self.image_size, self.image_size)
        images = torch.empty((self.classes * per_class, *shape), dtype=torch.uint8)
        labels = torch.empty(self.classes * per_class, dtype=torch.int64)
        training = torch.empty(self.classes * per_class, dtype=torch.bool)
        taken = [0] * self.classes
        generator, noise = torch.Generator(), torch.empty(shape)
        index, kept = 0, 0
        while kept < len(labels):
            generator.manual_seed(index + self.seed * SEED_STRIDE)
            torch.randn(shape, generator=generator, out=noise)
            label = int(torch.randint(0, self.classes, (1,), generator=generator))
            index += 1
            if taken[label] == per_class:
                continue
            images[kept] = noise.mul(255).byte()
            labels[kept], training[kept] = label, taken[label] < self.train_per_class
            taken[label] += 1
            kept += 1
        names = [str(c) for c in range(self.classes)]
        return (ImageSet(images[training], labels[training], names),
                ImageSet(images[~training], labels[~training], names))
