"""CelebA's five hair-colour classes (Black, Brown, Blond, Gray, Bald), from a data root."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmark.data import (DatasetDefaults, DatasetSource, ImageSet, file_fingerprint,
                            visible_files)
from benchmark.data.embedded import TEST_SPLIT_SEED
from benchmark.data.folder import read_images, why_unreadable
from benchmark.data.profiles import draw_per_class
from benchmark.errors import UserError, one_line
from benchmark.registry import DATASETS

# Class order is the EOS paper's; with the "exp" profile the first class keeps the most images.
HAIR_CLASSES = ["Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair", "Bald"]
TRAIN_PARTITION, TEST_PARTITION = 0, 2  # list_eval_partition.txt: 0 train, 1 valid, 2 test
ATTRIBUTES_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_FOLDER = "img_align_celeba"
HOME_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
# Part of the cache file's name: bump when the same name would hold different images.
# 2: the name ends with the fingerprint of the files the images were decoded from.
CACHE_VERSION = 2
SOURCE_DIGEST_LENGTH = 16  # hex digits of the sources' fingerprint kept in names


@DATASETS.register("celeba")
class CelebAHair(DatasetSource):
    """CelebA hair colour: 5 exclusive classes, 64x64, at most 5,000 train, 1,000 test each.

    An image belongs to a class when exactly one of Black_Hair, Brown_Hair, Blond_Hair,
    Gray_Hair and Bald is set (the attributes overlap; overlapping and hair-less images are
    dropped).  The training pool is the official train partition, capped at
    ``train_per_class`` images per class (5,000, the CNN-fragility paper's count) by a fixed
    draw; the test set is a fixed balanced draw of ``min(test_per_class, smallest class)``
    images per class (1,000 at most) from the official test partition.  Both draws use
    ``TEST_SPLIT_SEED``: they are part of the dataset's definition.  Images are the aligned
    178x218 faces, centre-cropped to 178x178 (hair stays in view) and resized to 64x64;
    ``--image-size`` resizes further.  Only the kept images are decoded, and the result is
    cached as ``<root>/celeba/hair5-64px-train5000-test1000-v2-<sources>.pt``, where
    ``<sources>`` fingerprints the files it was decoded from: changed files are decoded
    anew (the stale cache is deleted), and once the cache exists the images may be deleted.

    Identity: ``params`` and that fingerprint, ``file_fingerprint`` (relative path, size,
    mtime; hashing 1.4 GB of JPEGs would cost seconds to minutes a run) of the two lists and
    every file in img_align_celeba/, relative to ``<root>/celeba``; without those files, the
    fingerprint in the cache's name.

    Files are read in torchvision's layout, ``<root>/celeba/list_attr_celeba.txt``,
    ``list_eval_partition.txt`` and ``img_align_celeba/*.jpg``, without its md5 checks or
    its other files, so a copy placed by hand works; ``download`` asks torchvision to fetch it.
    """

    defaults = DatasetDefaults(epochs=50, batch_size=128, image_size=64, ratio=40, hflip=True)

    def __init__(self, root: str | None = None, download: bool = False, *,
                 train_per_class: int = 5000, test_per_class: int = 1000):
        super().__init__(root, download)
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class

    @property
    def params(self) -> dict:
        return {"train_per_class": self.train_per_class, "test_per_class": self.test_per_class,
                "decoded_size": self.defaults.image_size, "classes": ",".join(HAIR_CLASSES)}

    @property
    def folder(self) -> Path:
        return self.data_root / "celeba"

    def data_fingerprint(self) -> dict:
        """``{"sources_stat_sha256": ...}``: see the class.  When neither the files nor a
        decoded cache are there, the ``UserError`` of ``load``; with ``download``
        ``{"to_download": [...]}`` instead (torchvision md5-checks what it fetches)."""
        digest = self.sources_digest()
        if digest is None:
            cache = self.existing_cache()
            if cache is None and self.download:
                return {"to_download": self.missing_sources()}
            if cache is None:
                raise self.not_found()
            digest = cache.stem[len(self.cache_prefix):]
        return {"sources_stat_sha256": digest}

    def sources_digest(self) -> str | None:
        """The fingerprint of the attribute and partition lists and of every file in
        img_align_celeba/ (None when one of them is missing)."""
        if self.missing_sources():
            return None
        paths = [ATTRIBUTES_FILE, PARTITION_FILE,
                 *(f"{IMAGE_FOLDER}/{name}" for name in visible_files(self.folder / IMAGE_FOLDER))]
        return file_fingerprint(self.folder, paths)["stat_sha256"][:SOURCE_DIGEST_LENGTH]

    @property
    def cache_prefix(self) -> str:
        return (f"hair5-{self.defaults.image_size}px-train{self.train_per_class}"
                f"-test{self.test_per_class}-v{CACHE_VERSION}-")

    def cache_for(self, digest: str) -> Path:
        return self.folder / f"{self.cache_prefix}{digest}.pt"

    def existing_cache(self) -> Path | None:
        """The newest decoded cache of these parameters, whatever files it came from."""
        found = list(self.folder.glob(f"{self.cache_prefix}*.pt")) if self.folder.is_dir() else []
        return max(found, key=lambda path: path.stat().st_mtime_ns, default=None)

    @property
    def cache_file(self) -> Path | None:
        """The decoded cache that ``load`` reads or writes: the one of the current files, or
        without them the one there is (None: neither)."""
        digest = self.sources_digest()
        return self.cache_for(digest) if digest else self.existing_cache()

    def load(self) -> tuple[ImageSet, ImageSet]:
        digest = self.sources_digest()
        cache = self.cache_for(digest) if digest else self.existing_cache()
        cached = self.read_cache(cache) if cache else None
        if cached is not None:
            return cached
        if digest is None:
            self.ensure_files()
            digest = self.sources_digest()
        names, hair = read_attributes(self.folder / ATTRIBUTES_FILE)
        partition_of = read_partition(self.folder / PARTITION_FILE)
        partition = np.array([partition_of.get(name, -1) for name in names])
        labels = np.where((hair == 1).sum(axis=1) == 1, hair.argmax(axis=1), -1)

        train_rows, train_counts = exclusive_rows(labels, partition, TRAIN_PARTITION, "train")
        pool_rows = train_rows[draw_per_class(
            labels[train_rows], np.minimum(train_counts, self.train_per_class).tolist(),
            seed=TEST_SPLIT_SEED)]
        test_rows, test_counts = exclusive_rows(labels, partition, TEST_PARTITION, "test")
        per_class = int(min(self.test_per_class, test_counts.min()))
        test_rows = test_rows[draw_per_class(labels[test_rows], [per_class] * len(HAIR_CLASSES),
                                             seed=TEST_SPLIT_SEED)]
        pool = self.image_set([names[i] for i in pool_rows], labels[pool_rows])
        test = self.image_set([names[i] for i in test_rows], labels[test_rows])
        self.write_cache(self.cache_for(digest), pool, test)
        return pool, test

    def image_set(self, names: list[str], labels: np.ndarray) -> ImageSet:
        """The named images of img_align_celeba/, decoded; any unreadable one is an error."""
        paths = [self.folder / IMAGE_FOLDER / name for name in names]
        results = read_images(paths, self.defaults.image_size)
        failed = [f"{path.name} ({why_unreadable(result)})"
                  for path, result in zip(paths, results) if isinstance(result, Exception)]
        if failed:
            raise UserError(f"{len(failed)} CelebA image(s) in {self.folder / IMAGE_FOLDER} "
                            f"cannot be read: {', '.join(failed[:5])}"
                            f"{', ...' if len(failed) > 5 else ''}; extract img_align_celeba.zip "
                            f"there again")
        return ImageSet(torch.from_numpy(np.stack(results)), torch.from_numpy(labels),
                        list(HAIR_CLASSES))

    def placement(self) -> str:
        return (f"get img_align_celeba.zip, {ATTRIBUTES_FILE} and {PARTITION_FILE} from "
                f"{HOME_PAGE} (its Google Drive link) and put them in {self.folder}/, the zip "
                f"extracted there (giving {self.folder / IMAGE_FOLDER}/000001.jpg ...)")

    def missing_sources(self) -> list[str]:
        present = [(self.folder / ATTRIBUTES_FILE).is_file(),
                   (self.folder / PARTITION_FILE).is_file(), (self.folder / IMAGE_FOLDER).is_dir()]
        return [name for name, there in zip([ATTRIBUTES_FILE, PARTITION_FILE, IMAGE_FOLDER],
                                            present) if not there]

    def not_found(self) -> UserError:
        return UserError(f"CelebA not found under {self.data_root} (no "
                         f"{self.folder / self.missing_sources()[0]}): {self.placement()}, or "
                         f"add --download when online")

    def ensure_files(self) -> None:
        if self.missing_sources() and self.download:
            self.fetch()
        if self.missing_sources():
            raise self.not_found()

    def fetch(self) -> None:
        from torchvision.datasets import CelebA

        try:
            CelebA(str(self.data_root), split="all", target_type=[], download=True)
        except Exception as err:  # gdown missing, Google Drive quota, bad md5: all end here
            message = f"CelebA download failed ({one_line(err)}); {self.placement()}"
            raise UserError(message) from err

    @staticmethod
    def read_cache(cache: Path) -> tuple[ImageSet, ImageSet] | None:
        if not cache.is_file():
            return None
        try:
            saved = torch.load(cache, weights_only=True)
            return (ImageSet(saved["pool_images"], saved["pool_labels"], saved["classes"]),
                    ImageSet(saved["test_images"], saved["test_labels"], saved["classes"]))
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {cache} ({one_line(err)})")
            return None

    def write_cache(self, cache: Path, pool: ImageSet, test: ImageSet) -> None:
        """Saves the decoded images as ``cache`` and deletes the caches of the same
        parameters decoded from other files (stale, and 370 MB each at full size)."""
        partial = cache.with_suffix(".partial")
        try:
            torch.save({"pool_images": pool.images, "pool_labels": pool.labels,
                        "test_images": test.images, "test_labels": test.labels,
                        "classes": pool.classes}, partial)
            os.replace(partial, cache)  # never leaves a half-written cache behind
        except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
            partial.unlink(missing_ok=True)
            warnings.warn(f"could not cache the decoded CelebA images in {cache} "
                          f"({one_line(err)}); the next run decodes them again")
            return
        for stale in self.folder.glob(f"{self.cache_prefix}*.pt"):
            if stale != cache:
                stale.unlink(missing_ok=True)


def exclusive_rows(labels: np.ndarray, partition: np.ndarray, part: int,
                   name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one partition whose image has exactly one hair class, and the per-class counts."""
    rows = np.flatnonzero((partition == part) & (labels >= 0))
    counts = np.bincount(labels[rows], minlength=len(HAIR_CLASSES))
    empty = [HAIR_CLASSES[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise UserError(f"CelebA's {name} partition has no image of class(es) "
                        f"{', '.join(empty)}; is {ATTRIBUTES_FILE} or {PARTITION_FILE} "
                        f"incomplete?")
    return rows, counts


def read_attributes(path: Path) -> tuple[list[str], np.ndarray]:
    """Image names and their hair attributes (+1 set, -1 not), columns in ``HAIR_CLASSES``
    order, from list_attr_celeba.txt: a count line, the attribute names, one row per image."""
    lines = path.read_text().splitlines()
    try:
        declared = int(lines[0])
    except (IndexError, ValueError):
        raise UserError(f"{path} does not start with the image count line of "
                        f"{ATTRIBUTES_FILE}") from None
    attributes = lines[1].split() if len(lines) > 1 else []
    absent = [name for name in HAIR_CLASSES if name not in attributes]
    if absent:
        raise UserError(f"{path} names no attribute {', '.join(absent)} on its second line")
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != declared:
        raise UserError(f"{path} declares {declared} images but lists {len(rows)} "
                        f"(an incomplete copy?)")
    malformed = next((i for i, row in enumerate(rows) if len(row) != len(attributes) + 1), None)
    if malformed is not None:
        raise UserError(f"{path} line {malformed + 3} has {len(rows[malformed]) - 1} values "
                        f"for {len(attributes)} attributes")
    columns = [attributes.index(name) + 1 for name in HAIR_CLASSES]
    try:
        hair = np.array([[row[c] for c in columns] for row in rows], dtype=np.int8)
    except ValueError as err:
        raise UserError(f"{path} holds a value that is not +1 or -1 ({one_line(err)})") from None
    return [row[0] for row in rows], hair


def read_partition(path: Path) -> dict[str, int]:
    """Image name -> partition (0 train, 1 valid, 2 test) from list_eval_partition.txt."""
    partition = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise UserError(f"{path} line {number} is not '<image name> <0, 1 or 2>'")
        partition[fields[0]] = int(fields[1])
    return partition
