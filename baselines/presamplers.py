"""Pixel-space comparators (EOS paper, Table I): samplers on the flattened training images, before phase 1."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.data import ImageSet
from benchmark.errors import UserError, one_line
from benchmark.methods import SamplerMethod
from benchmark.registry import METHODS


class PixelResampling(SamplerMethod):
    """Phase 1 trains on the real training images plus the sampler's synthetic ones (rounded
    back to uint8; augmentation as usual); phase 3 is skipped and the plain head evaluated.

    The sampler's seed is the subset seed, not the training seed: the resampled training set
    is a cached stage that every training seed of the same subset reuses."""

    def prepare_training_set(self, cell, train: ImageSet) -> ImageSet:
        from baselines.pixel import resample_images  # scikit-learn's SVM: not at start-up

        sampler = self.make_sampler(random_state=cell.cfg.subset_seed)
        try:
            images, labels = resample_images(train.images, train.labels, sampler)
        except ValueError as err:  # e.g. SVMSMOTE: "All support vectors are considered as noise"
            raise UserError(f"method '{self.name}' cannot over-sample this training set: "
                            f"{one_line(err)}") from None
        return ImageSet(images, labels, train.classes)

    def training_set_artifacts(self, cell, real: ImageSet, combined: ImageSet,
                               folder: Path) -> None:
        from baselines.pixel import plot_sample_grid

        n = len(real)
        plot_sample_grid(real.images, real.labels, combined.images[n:], combined.labels[n:],
                         real.classes, folder / "samples.png")


@METHODS.register("pre-smote")
class PixelSMOTE(PixelResampling):
    """SMOTE on the training images' pixels before phase 1 (imbalanced-learn); no phase 3."""

    sampler = "imblearn.over_sampling:SMOTE"
    neighbour_params = ("k_neighbors",)


@METHODS.register("pre-bsmote")
class PixelBorderlineSMOTE(PixelResampling):
    """Borderline-SMOTE on the training images' pixels before phase 1; no phase 3."""

    sampler = "imblearn.over_sampling:BorderlineSMOTE"
    neighbour_params = ("k_neighbors",)


@METHODS.register("pre-balsvm")
class PixelBalancedSVM(PixelResampling):
    """Balanced SVM (SVMSMOTE) on the training images' pixels before phase 1; no phase 3."""

    sampler = "imblearn.over_sampling:SVMSMOTE"
    neighbour_params = ("k_neighbors",)

    def make_sampler(self, random_state: int) -> Any:
        sampler = super().make_sampler(random_state)
        if sampler.svm_estimator is None:
            from baselines.pixel import FitOnceSVC

            # The same SVM as SVMSMOTE's default, fitted once instead of once per class (one
            # fit on CIFAR-10-LT's 12,406 images takes about 12 minutes of CPU).
            sampler.svm_estimator = FitOnceSVC(gamma="scale", random_state=random_state)
        return sampler


@METHODS.register("pre-eos")
class PixelEOS(PixelResampling):
    """EOS on the training images' pixels before phase 1 (toward nearest enemies); no phase 3."""

    sampler = "benchmark.eos:EOS"
    fixed = {"neighbour_rule": "nearest-enemy"}
