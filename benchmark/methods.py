"""Methods as named bundles of pipeline hooks; the plain model and the two EOS variants."""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from benchmark.registry import METHODS


class Method:
    """Base of every method: the plain phase-1 model, no hooks.

    Hooks a subclass may override:
    - ``phase1_identity()``: parameters that change what phase 1 trains (pixel-space samplers,
      batch hooks); they join the stage-cache key, so post-hoc methods (which return ``{}``)
      share one trained extractor.
    - ``embedding_resampler(random_state)``: an object with imbalanced-learn's
      ``fit_resample(X, y)``; when it returns one, phase 3 retrains the head on its output.
    ``params`` are the method's hyper-parameters, logged with every run.
    """

    def __init__(self, **params: Any):
        self.params = params

    def accepted_params(self) -> set[str]:
        """Names of the parameters ``params`` may hold (the config checks against them)."""
        return set()

    def phase1_identity(self) -> dict:
        return {}

    def embedding_resampler(self, random_state: int) -> Any | None:
        return None


@METHODS.register("none")
class Plain(Method):
    """The phase-1 model as trained, evaluated without any resampling."""


class EmbeddingResampling(Method):
    """Phase 3: resample the training embeddings with ``sampler`` and retrain the head.

    ``sampler`` is ``"module:Class"``, imported on first use (imbalanced-learn costs a second
    of start-up that ``list`` need not pay); ``fixed`` are constructor arguments the method
    pins; the rest of the constructor's keyword arguments are the method's parameters.
    """

    sampler: str
    fixed: dict = {}

    def sampler_class(self) -> Any:
        module, name = self.sampler.split(":")
        return getattr(importlib.import_module(module), name)

    def accepted_params(self) -> set[str]:
        signature = inspect.signature(self.sampler_class().__init__)
        return {p for p in signature.parameters if p != "self"} - set(self.fixed) - {
            "random_state", "sampling_strategy", "n_jobs"}

    def embedding_resampler(self, random_state: int) -> Any:
        return self.sampler_class()(random_state=random_state, **self.fixed, **self.params)


@METHODS.register("eos")
class ExpansiveOverSampling(EmbeddingResampling):
    """EOS: embeddings over-sampled toward true nearest enemies, then the head is retrained."""

    sampler = "benchmark.eos:EOS"
    fixed = {"neighbour_rule": "nearest-enemy"}


@METHODS.register("eos-ref")
class ExpansiveOverSamplingReference(EmbeddingResampling):
    """EOS with the reference code's off-by-one partner choice, to replicate published numbers."""

    sampler = "benchmark.eos:EOS"
    fixed = {"neighbour_rule": "reference-off-by-one"}
