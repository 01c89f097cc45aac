"""A benchmark suite for deep learning on imbalanced images: EOS and its rivals, tracked in MLflow."""

__version__ = "0.1.0"
