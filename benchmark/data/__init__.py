"""Dataset sources: what a registered dataset returns and the defaults it declares."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

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
    follow torchvision's conventions.  A subclass that reads files overrides
    ``data_fingerprint`` so that ``identity`` tells its data apart from other data.
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

    def identity(self) -> dict:
        """What data this source reads: a small JSON-serialisable dict, equal in every process
        for the same data and different for different data, computed without decoding any
        image (part of the phase-1 cache key, computed for every run).

        ``{"params": self.params, "data": self.data_fingerprint()}``.  It describes the files
        as they are now: files changed after a ``load`` in this process are not in the loaded
        arrays, but are in the identity read after it.
        """
        return {"params": self.params, "data": self.data_fingerprint()}

    def data_fingerprint(self) -> dict:
        """The part of ``identity`` that names the data read, beyond ``params``.

        This default serves sources that do not say: the resolved ``--data-root`` when one is
        given (different folders never share an identity, but a changed folder keeps it), else
        nothing.  Every built-in dataset overrides it.
        """
        return {"root": str(self.data_root.resolve())} if self.root else {}

    @property
    def data_root(self) -> Path:
        """``--data-root``, else ``$BENCHMARK_DATA_ROOT``, else ``./data``."""
        return Path(self.root or os.environ.get("BENCHMARK_DATA_ROOT", "data")).expanduser()


def visible_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a path relative to it ("a/b.png"), without hidden
    entries (names starting with ".", and everything inside hidden folders): .DS_Store and
    .ipynb_checkpoints/ are never data.  Sorted part by part, as sorted ``Path`` objects are.

    Links to files count as files; links to folders below ``folder`` are not followed.  Names
    come from the directory entries alone (no ``stat`` of regular files), as strings (``Path``
    objects would triple the time on CelebA's 200k files).
    """
    found: list[tuple[str, ...]] = []

    def walk(directory: str, parts: tuple[str, ...]) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, parts + (entry.name,))
                elif entry.is_file():
                    found.append(parts + (entry.name,))

    walk(str(folder), ())
    found.sort()
    return ["/".join(parts) for parts in found]


def file_fingerprint(base: Path, relative_paths: Iterable[str]) -> dict:
    """``{"files", "bytes", "stat_sha256"}`` of the files at ``relative_paths`` under
    ``base`` (POSIX separators): their count, total size and the SHA-256 of every file's
    relative path, size and modification time in nanoseconds, in the order given.

    File metadata rather than content: one ``stat`` per file keeps this near a second for
    CelebA's 200k images, where hashing their 1.4 GB would take seconds to minutes every run.
    Any rewrite that changes a file's size or modification time changes the fingerprint, and
    so does adding, removing or renaming a file.  The absolute location is left out: the same
    files moved, or copied with their times kept (``mv``, ``cp -a``, ``rsync -a``, tar and
    most archive tools), keep the fingerprint; a copy that resets the times does not (a
    harmless miss).  Blind spot: different bytes under the same names with the same sizes
    and the same nanosecond modification times (e.g. two archives that both pin every file's
    time, holding fixed-size formats).
    """
    digest = hashlib.sha256()
    count = total = 0
    folders: dict[str, int] = {}  # open descriptors: stat by name is twice as fast as by path
    by_name = os.stat in os.supports_dir_fd
    try:
        for relative in relative_paths:
            if by_name:
                parent, name = os.path.split(relative)
                if parent not in folders:
                    folders[parent] = os.open(os.path.join(base, parent), os.O_RDONLY)
                stat = os.stat(name, dir_fd=folders[parent])
            else:
                stat = os.stat(os.path.join(base, relative))
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(
                "utf-8", "surrogateescape"))
            count, total = count + 1, total + stat.st_size
    finally:
        for descriptor in folders.values():
            os.close(descriptor)
    return {"files": count, "bytes": total, "stat_sha256": digest.hexdigest()}
