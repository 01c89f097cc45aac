"""Comparators of the suite, each registered into the engine's registries on import."""
from baselines import losses, samplers  # noqa: F401
