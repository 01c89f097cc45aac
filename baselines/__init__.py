"""Comparators of the suite, each registered into the engine's registries on import."""
from baselines import (balanced_head, cam, decoupling, generative, losses, mixing,  # noqa: F401
                       presamplers, rsg, samplers)
