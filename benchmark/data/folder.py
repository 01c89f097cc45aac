"""A user's own images, one folder per class."""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmark.data import (DatasetDefaults, DatasetSource, ImageSet, file_fingerprint,
                            visible_files)
from benchmark.data.embedded import TEST_SPLIT_SEED
from benchmark.data.profiles import stratified_split
from benchmark.errors import UserError, one_line
from benchmark.registry import DATASETS

# Share of every class held out as the test set when the tree has no test/ folder.
TEST_FRACTION = 0.2
# Names of the skipped files a warning spells out; the rest are counted.
MAX_NAMED_SKIPS = 50


def read_square_rgb(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``[3, size, size]``: RGB, the centred square, resized.

    Raises ``OSError`` (or ``ValueError``) for anything PIL cannot decode.  The centred
    square keeps the aspect ratio: faces and objects are not squashed.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        # JPEG decoders can scale by 1/2, 1/4 or 1/8 while decoding (never below ``size``):
        # much faster for large photos and CelebA, and the resize below smooths anyway.
        img.draft("RGB", (size, size))
        img = as_rgb(ImageOps.exif_transpose(img))
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    # Bilinear with antialiasing, like the pipeline's own resize.
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def as_rgb(img):
    """A PIL image as 8-bit RGB; 16-bit grey ("I;16*", and "I" taken as 0..65535) is scaled
    by 1/257 (65535 -> 255) where PIL's own conversion would clip it to near white."""
    from PIL import Image

    if img.mode.startswith("I"):
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L")
    return img.convert("RGB")


def read_images(paths: list[Path], size: int) -> list[np.ndarray | Exception]:
    """``read_square_rgb`` for every path, in order; a failure comes back as its exception.

    Threads overlap the decoding (PIL releases the GIL while it decodes)."""
    from PIL import Image

    def read(path: Path) -> np.ndarray | Exception:
        try:
            return read_square_rgb(path, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return err

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(read, paths))


def why_unreadable(err: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image"
    if isinstance(err, FileNotFoundError):
        return "missing"
    return one_line(err)


@DATASETS.register("folder")
class ImageFolder(DatasetSource):
    """Your own images: --data-root PATH holding PATH/<class>/* or PATH/train|test/<class>/*.

    Two layouts.  ``PATH/<class>/*``: a stratified 20 % of every class (fixed seed) is held
    out as the test set.  ``PATH/train/<class>/*``: the training pool, with
    ``PATH/test/<class>/*`` as the test set when that folder exists (same class names) and a
    stratified 20 % of train otherwise.  Classes are the sorted folder names; files may sit in
    sub-folders of a class folder.  Every file PIL can read is converted to RGB and its
    centred square resized to 32x32 (``--image-size`` resizes further); anything else is
    skipped and named in a warning.  Hidden files and folders (names starting with ".") are
    ignored.  A top-level folder named train/ selects the second layout.  The test set keeps
    the data's own class proportions, and the default "natural" profile keeps the training
    pool as it is.
    """

    defaults = DatasetDefaults(epochs=30, batch_size=128, image_size=32, ratio=1,
                               profile="natural", hflip=True)

    def load(self) -> tuple[ImageSet, ImageSet]:
        root = self.tree_root()
        skipped: list[str] = []
        try:
            pool, test = self.read_layout(root, skipped)
        finally:  # also when a class turns out empty: the skipped files are likely why
            self.report_skipped(skipped, root)
        if test is None:
            return self.hold_out_test(pool, root)
        return pool, test

    def data_fingerprint(self) -> dict:
        """``file_fingerprint`` of every file ``load`` tries (relative path, size, mtime; see
        there why not content): the class folders' files, whatever their format, without the
        hidden ones and the stray files beside the class folders.  Paths are relative to
        ``--data-root``, so the same tree moved elsewhere keeps its identity."""
        root = self.tree_root()
        train_dir, test_dir = self.split_folders(root)
        paths = []
        for folder in filter(None, (train_dir, test_dir)):
            prefix = "" if folder == root else f"{folder.name}/"
            paths += [prefix + path for path in
                      self.class_files(folder, self.class_names(folder, root, []))[0]]
        return file_fingerprint(root, paths)

    def tree_root(self) -> Path:
        if not self.root:
            raise UserError("dataset 'folder' needs --data-root PATH: a folder with one "
                            "sub-folder of images per class (or train/ and test/ holding them)")
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise UserError(f"--data-root {root} is not a folder")
        return root

    @staticmethod
    def split_folders(root: Path) -> tuple[Path, Path | None]:
        """The folder holding the training classes and the one holding the test classes
        (None: the test set is held out of the training classes)."""
        train_dir, test_dir = root / "train", root / "test"
        if not train_dir.is_dir():
            if test_dir.is_dir():
                raise UserError(f"{root} has a test/ folder but no train/ folder beside it")
            return root, None
        return train_dir, test_dir if test_dir.is_dir() else None

    def read_layout(self, root: Path, skipped: list[str]) -> tuple[ImageSet, ImageSet | None]:
        """The training pool and, where the tree has a test/ folder, the test set."""
        train_dir, test_dir = self.split_folders(root)
        classes = self.class_names(train_dir, root, skipped)
        pool = self.read_tree(train_dir, classes, root, skipped)
        if test_dir is None:
            return pool, None
        test_classes = self.class_names(test_dir, root, skipped)
        if test_classes != classes:
            raise UserError(
                f"{test_dir} and {train_dir} must hold the same class folders; only in "
                f"train: {sorted(set(classes) - set(test_classes)) or 'none'}, only in "
                f"test: {sorted(set(test_classes) - set(classes)) or 'none'}")
        return pool, self.read_tree(test_dir, classes, root, skipped)

    @staticmethod
    def class_names(folder: Path, root: Path, skipped: list[str]) -> list[str]:
        entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
        skipped += [f"{p.relative_to(root)} (not inside a class folder)"
                    for p in entries if not p.is_dir()]
        classes = [p.name for p in entries if p.is_dir()]
        if not classes:
            raise UserError(f"{folder} holds no class folders: put each class's images in "
                            f"{folder}/<class name>/")
        return classes

    @staticmethod
    def class_files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
        """Every file of every class folder (sub-folders included, hidden entries not) as a
        path relative to ``folder``, in class order and sorted within a class, with its
        class's label."""
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = [f"{name}/{path}" for path in visible_files(folder / name)]
            paths += files
            labels += [label] * len(files)
        return paths, labels

    def read_tree(self, folder: Path, classes: list[str], root: Path,
                  skipped: list[str]) -> ImageSet:
        relative, labels = self.class_files(folder, classes)
        paths = [folder / path for path in relative]
        images, kept = [], []
        results = read_images(paths, self.defaults.image_size)
        for path, label, result in zip(paths, labels, results):
            if isinstance(result, Exception):
                skipped.append(f"{path.relative_to(root)} ({why_unreadable(result)})")
            else:
                images.append(result)
                kept.append(label)
        counts = np.bincount(np.asarray(kept, dtype=np.int64), minlength=len(classes))
        empty = [f"{folder / classes[c]}" for c in np.flatnonzero(counts == 0)]
        if empty:
            raise UserError(f"no readable images in class folder(s) {', '.join(empty)}")
        return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(kept), classes)

    @staticmethod
    def report_skipped(skipped: list[str], root: Path) -> None:
        if not skipped:
            return
        named = "; ".join(skipped[:MAX_NAMED_SKIPS])
        unnamed = len(skipped) - MAX_NAMED_SKIPS
        more = f"; and {unnamed} more" if unnamed > 0 else ""
        warnings.warn(f"skipped {len(skipped)} file(s) under {root} that are not readable "
                      f"images: {named}{more}", stacklevel=3)

    @staticmethod
    def hold_out_test(pool: ImageSet, root: Path) -> tuple[ImageSet, ImageSet]:
        counts = torch.bincount(pool.labels, minlength=pool.num_classes)
        too_small = [pool.classes[c] for c in torch.nonzero(counts < 2).flatten().tolist()]
        if too_small:
            raise UserError(f"class(es) {', '.join(too_small)} under {root} have fewer than 2 "
                            f"images; each class needs one for training and one for the test set")
        keep, held = stratified_split(pool.labels.numpy(), TEST_FRACTION, seed=TEST_SPLIT_SEED)
        return pool.subset(torch.from_numpy(keep)), pool.subset(torch.from_numpy(held))
