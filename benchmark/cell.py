"""The context one benchmark cell's stages share: configuration, data, device, run, generators."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from benchmark.data import ImageSet

if TYPE_CHECKING:
    from benchmark.config import RunConfig
    from benchmark.losses import Loss
    from benchmark.methods import Method
    from benchmark.tracking import TrackedRun


@dataclass
class CellData:
    """The images of one cell: long-tailed training subset, validation set, balanced test."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    train_indices: np.ndarray  # into the training pool: what phase 1 trains on
    val_indices: np.ndarray  # into the training pool
    profile_counts: list[int]
    mean: torch.Tensor
    std: torch.Tensor
    validation: str  # how the validation set was drawn ("balanced" or "fraction")
    validation_note: str = ""  # why "auto" chose it, when it fell back

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.train.labels, minlength=self.train.num_classes).tolist()

    @property
    def val_class_counts(self) -> list[int]:
        return torch.bincount(self.val.labels, minlength=self.val.num_classes).tolist()


def stream_seed(seed: int, name: str) -> int:
    """A seed of its own for each named random stream of a cell, stable across processes."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Cell:
    """What travels between the stages of one cell (and into every method hook).

    ``generator(name)`` hands out one CPU generator per named random stream, so a method that
    draws (mixup's lambdas, say) never shifts the draws of another stream; the batch order and
    augmentation stream ``"batches"`` is seeded with the training seed itself.  ``timings``
    collects ``{stage: seconds}``, logged as ``time/<stage>_s`` (a training-set hook may add
    a sub-stage of its own, e.g. ``generator``).
    """

    cfg: "RunConfig"
    method: "Method"
    data: CellData
    device: torch.device
    loss: "Loss"
    progress: bool = True
    run: "TrackedRun | None" = None
    timings: dict[str, float] = field(default_factory=dict)
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    callbacks: list = field(default_factory=list)  # the method and the diagnostics

    def generator(self, name: str) -> torch.Generator:
        if name not in self.generators:
            seed = self.cfg.seed if name == "batches" else stream_seed(self.cfg.seed, name)
            self.generators[name] = torch.Generator().manual_seed(seed)
        return self.generators[name]

    def on_epoch_end(self, phase: str, epoch: int, record: dict) -> None:
        """Every epoch of phases 1 and 3, to the method and each diagnostic."""
        for callback in self.callbacks:
            callback.on_epoch_end(self, phase, epoch, record)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step=step)

    @property
    def class_counts(self) -> list[int]:
        return self.data.class_counts
