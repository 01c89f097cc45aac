"""Feature-space comparators: imbalanced-learn's SMOTE, Borderline-SMOTE and SVM-SMOTE on embeddings."""
from __future__ import annotations

from benchmark.methods import EmbeddingResampling
from benchmark.registry import METHODS


@METHODS.register("smote")
class EmbeddingSMOTE(EmbeddingResampling):
    """SMOTE on the training embeddings (imbalanced-learn), then the head is retrained."""

    sampler = "imblearn.over_sampling:SMOTE"
    # Neighbours are searched inside each class to over-sample.
    neighbour_params = ("k_neighbors",)


@METHODS.register("bsmote")
class EmbeddingBorderlineSMOTE(EmbeddingResampling):
    """Borderline-SMOTE on the training embeddings (imbalanced-learn), then the head is retrained."""

    sampler = "imblearn.over_sampling:BorderlineSMOTE"
    # Neighbours are searched inside each class to over-sample.
    neighbour_params = ("k_neighbors",)


@METHODS.register("balsvm")
class EmbeddingBalancedSVM(EmbeddingResampling):
    """Balanced SVM (imbalanced-learn's SVMSMOTE) on the training embeddings, then the head is retrained."""

    sampler = "imblearn.over_sampling:SVMSMOTE"
    # Neighbours are searched inside each class to over-sample.
    neighbour_params = ("k_neighbors",)
