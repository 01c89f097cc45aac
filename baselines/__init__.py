"""Comparators of the suite, each registered into the engine's registries on import."""
from baselines import losses, mixing, presamplers, samplers  # noqa: F401
