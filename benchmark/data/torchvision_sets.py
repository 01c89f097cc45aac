"""CIFAR-10, CIFAR-100 and SVHN through torchvision, with the papers' long-tailed profiles."""
from __future__ import annotations

import numpy as np
import torch

from benchmark.data import DatasetDefaults, DatasetSource, ImageSet, file_fingerprint
from benchmark.data.embedded import TEST_SPLIT_SEED
from benchmark.data.profiles import draw_per_class
from benchmark.errors import UserError, one_line
from benchmark.registry import DATASETS


def as_image_set(images: np.ndarray, labels, classes: list[str]) -> ImageSet:
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                    torch.as_tensor(np.asarray(labels), dtype=torch.int64), list(classes))


class TorchvisionSource(DatasetSource):
    """A dataset read by its torchvision class from files under ``data_root``.

    torchvision verifies every file's md5 sum; a missing file (without ``download``) or a
    failed check or download becomes one ``UserError`` line that says how to get the files.

    Identity: ``file_fingerprint`` of the files read (path relative to ``data_root``, size,
    mtime) and the md5 sums torchvision checks them against on every load.  The check pins the
    content of a load that succeeds to the official files, so the metadata only has to tell
    apart what the check does not see: files that pass a disabled check (the tests' fixtures
    switch it off) or a future torchvision expecting other files.  Hashing the content here
    would repeat torchvision's 0.2 to 0.5 s md5 pass for every run.
    """

    title: str  # the dataset's name as people write it

    torchvision_name: str  # the class in torchvision.datasets

    def torchvision_class(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_name)

    def expected_md5(self, dataset_class: type) -> dict[str, str]:
        """The files the dataset reads, relative to ``data_root``, and the md5 sum
        torchvision checks for each."""
        raise NotImplementedError

    def expected_files(self, dataset_class: type) -> list[str]:
        return list(self.expected_md5(dataset_class))

    def how_to_get(self, dataset_class: type) -> str:
        raise NotImplementedError

    def missing_files(self, dataset_class: type) -> list[str]:
        return [name for name in self.expected_files(dataset_class)
                if not (self.data_root / name).is_file()]

    def not_found(self, dataset_class: type, missing: list[str]) -> UserError:
        return UserError(f"{self.title} not found under {self.data_root} (no {missing[0]}): "
                         f"{self.how_to_get(dataset_class)}, or add --download when online")

    def data_fingerprint(self) -> dict:
        """The files' ``file_fingerprint`` and the md5 sums a load checks them against (see
        the class).  Missing files raise the ``UserError`` of ``load``; with ``download`` they
        are named instead: the files a load then fetches are the official ones, md5-checked.
        """
        dataset_class = self.torchvision_class()
        checked = {"checked_md5": self.expected_md5(dataset_class)}
        missing = self.missing_files(dataset_class)
        if missing and self.download:
            return {"to_download": missing, **checked}
        if missing:
            raise self.not_found(dataset_class, missing)
        return {**file_fingerprint(self.data_root, self.expected_files(dataset_class)), **checked}

    def open(self, **split):
        """The torchvision dataset for one split (downloading first if asked to)."""
        dataset_class = self.torchvision_class()
        root = self.data_root
        missing = self.missing_files(dataset_class)
        if missing and not self.download:
            raise self.not_found(dataset_class, missing)
        try:
            return dataset_class(str(root), download=self.download, **split)
        except (RuntimeError, OSError) as err:  # md5 mismatch; URLError is an OSError
            problem = ("could not be downloaded" if missing else
                       "failed torchvision's md5 check (corrupt or incomplete files?)")
            raise UserError(f"{self.title} under {root} {problem} ({one_line(err)}): "
                            f"{self.how_to_get(dataset_class)}") from err


class Cifar(TorchvisionSource):
    """CIFAR's pickled batches; the official test set (balanced already) is the test set."""

    def expected_md5(self, dataset_class: type) -> dict[str, str]:
        sums = dict(dataset_class.train_list + dataset_class.test_list)
        sums[dataset_class.meta["filename"]] = dataset_class.meta["md5"]
        return {f"{dataset_class.base_folder}/{name}": md5 for name, md5 in sums.items()}

    def how_to_get(self, dataset_class: type) -> str:
        root = self.data_root
        return (f"download {dataset_class.url} and extract it in {root} "
                f"(it unpacks to {root / dataset_class.base_folder}/)")

    def load(self) -> tuple[ImageSet, ImageSet]:
        train, test = self.open(train=True), self.open(train=False)
        # torchvision holds CIFAR as [N, H, W, C].
        return (as_image_set(train.data.transpose(0, 3, 1, 2), train.targets, train.classes),
                as_image_set(test.data.transpose(0, 3, 1, 2), test.targets, test.classes))


@DATASETS.register("cifar10")
class Cifar10(Cifar):
    """CIFAR-10 (32x32 colour, 10 classes); 5,000 training, 1,000 test images per class."""

    title = "CIFAR-10"
    defaults = DatasetDefaults(epochs=200, batch_size=128, image_size=32, ratio=100,
                               hflip=True, crop_padding=4)

    torchvision_name = "CIFAR10"


@DATASETS.register("cifar100")
class Cifar100(Cifar):
    """CIFAR-100 (32x32 colour, 100 fine classes); 500 training, 100 test images per class."""

    title = "CIFAR-100"
    defaults = DatasetDefaults(epochs=200, batch_size=128, image_size=32, ratio=10,
                               hflip=True, crop_padding=4)

    torchvision_name = "CIFAR100"


@DATASETS.register("svhn")
class Svhn(TorchvisionSource):
    """SVHN house-number digits (32x32 colour, train split); balanced test at 1,595 per class.

    SVHN's official test split is imbalanced (1,595 to 5,099 images per digit), so the test
    set is a fixed draw (``TEST_SPLIT_SEED``) of the smallest class's count from every class.
    The ``extra`` split is not used.  No horizontal flips: mirrored digits are other symbols.
    """

    title = "SVHN"
    defaults = DatasetDefaults(epochs=200, batch_size=128, image_size=32, ratio=100,
                               hflip=False, crop_padding=4)
    splits = ("train", "test")
    classes = [str(digit) for digit in range(10)]  # torchvision maps label 10 to digit 0

    torchvision_name = "SVHN"

    def expected_md5(self, dataset_class: type) -> dict[str, str]:
        return {dataset_class.split_list[split][1]: dataset_class.split_list[split][2]
                for split in self.splits}

    def how_to_get(self, dataset_class: type) -> str:
        urls = " and ".join(dataset_class.split_list[split][0] for split in self.splits)
        return f"download {urls} into {self.data_root}/"

    def load(self) -> tuple[ImageSet, ImageSet]:
        train, test = self.open(split="train"), self.open(split="test")
        counts = np.bincount(test.labels, minlength=len(self.classes))
        balanced = draw_per_class(test.labels, [int(counts.min())] * len(self.classes),
                                  seed=TEST_SPLIT_SEED)
        # torchvision already holds SVHN as [N, C, H, W].
        return (as_image_set(train.data, train.labels, self.classes),
                as_image_set(test.data[balanced], test.labels[balanced], self.classes))
