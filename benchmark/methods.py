"""The method lifecycle: hooks with no-op defaults that the pipeline calls for every cell."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from benchmark.errors import UserError, one_line
from benchmark.registry import METHODS
from benchmark.train import plain_step

if TYPE_CHECKING:  # the pipeline's types, only for annotations (no import cycle at run time)
    import numpy as np
    import torch

    from benchmark.cell import Cell
    from benchmark.config import RunConfig
    from benchmark.data import ImageSet
    from benchmark.models import Classifier
    from benchmark.train import Schedule, TensorBatches

# The cached stages a method can change, in pipeline order: each has its own cache key, built
# from the configuration's allow-list plus ``Method.stage_identity(stage)``.
STAGES = ("training_set", "phase1")

# Which hooks change which cached stage: overriding one of them makes the method part of that
# stage's key automatically (its class and every hyper-parameter), so no method can forget to.
STAGE_HOOKS = {"training_set": ("prepare_training_set",),
               "phase1": ("build_model", "train_step")}


# What a cell runs when no method is named: the method this suite exists to reproduce.
DEFAULT_METHOD = "eos"


def make_method(name: str, params: dict | None = None) -> "Method":
    """The registered method ``name`` with ``params``; it knows its own name."""
    method = METHODS.create(name, **(params or {}))
    method.name = name
    return method


class Method:
    """Base of every method: the plain phase-1 model, every hook a no-op.

    Configuration (before any run exists; a mistake raises ``UserError``):

    - ``accepted_params()``, ``hyperparameters()``: the parameter names it takes and every
      value in force, defaults included (logged as ``method_hparam.*``). The simplest way to
      declare them is the class attributes ``defaults`` and ``parameter_constraints``
      (scikit-learn's constraint language); ``validate()`` checks them.
    - ``adapt(class_counts)``: fit the parameters to the cell's training counts (e.g. clamp a
      neighbourhood to the smallest class) or refuse; returns notes for the user.
    - ``stage_identity(stage)``: what this method adds to the cache key of ``stage``.

    Stages, in pipeline order (``cell`` is a :class:`benchmark.cell.Cell`):

    - ``prepare_training_set(cell, train)``: the images phase 1 trains on [cached stage],
      computed inside the run (an exception ends it FAILED with the reason); seconds it
      records in ``cell.timings[<sub-stage>]`` (a generator's training) become
      ``time/<sub-stage>_s``, cached with the stage and left out of ``time/training_set_s``;
      ``training_set_artifacts(cell, real, combined, folder)``: figures of it.
    - ``build_model(cell, model)``: e.g. a module inserted at a named backbone stage.
    - ``train_step(cell)``: the phase-1 step ``(model, x, y, loss) -> loss`` (mixup, auxiliary
      losses).
    - ``on_epoch_end(cell, phase, epoch, record)``: after every epoch of phases 1 and 3.
    - ``phase2_outputs(cell, phase1)``: outputs beyond the pooled embeddings (feature maps).
    - ``embedding_resampler(random_state)``: an imbalanced-learn style sampler of embeddings.
    - ``retrains_head()``: whether phase 3 runs; ``head_step(cell)``: its training step.
    - ``head_training(cell, phase1, plan)``: what phase 3 trains, given the pipeline's
      :class:`HeadTraining` (module, batches, schedule): e.g. a fresh head, a wrapper whose
      only trainable parameters are per-class scales, class-balanced or augmented batches.
    - ``final_head(cell, head, val_bac)``: the head to evaluate, given the one phase 3 left (or
      phase 1's): e.g. a transformation chosen on ``val_bac(module) -> float``, the validation
      BAC of a candidate head.  The cell's validation BAC becomes that of the returned head.
    - ``on_cell_end(cell, results)``: after the test evaluation (diagnostics, figures);
      ``results`` holds the phase 1, the final head, the embeddings it was trained on,
      ``training_set`` (the images phase 1 trained on, real first; None where the whole phase
      1 was reused) and, when the test set was evaluated, ``metrics``.  A hook that needs
      another cell's model (the ``none`` model of the same cell, say) asks
      ``benchmark.pipeline.phase1_of``, which reuses or trains it through the stage cache.
    """

    name: str = ""
    defaults: dict = {}
    parameter_constraints: dict = {}

    def __init__(self, **params: Any):
        self.params = params
        self.notes: list[str] = []

    # Configuration ------------------------------------------------------------------------
    def accepted_params(self) -> set[str]:
        return set(self.defaults)

    def hyperparameters(self) -> dict:
        return {**self.defaults, **self.params}

    def validate(self) -> None:
        self.check_names()
        if self.parameter_constraints:
            from sklearn.utils._param_validation import validate_parameter_constraints

            try:
                validate_parameter_constraints(self.parameter_constraints,
                                               self.hyperparameters(), caller_name=self.name)
            except (ValueError, TypeError) as err:
                raise UserError(f"method '{self.name}': {one_line(err)}") from None

    def check_names(self) -> None:
        accepted = self.accepted_params()
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise UserError(f"method '{self.name}' takes no parameter {', '.join(unknown)}"
                            f"{'; it takes ' + ', '.join(sorted(accepted)) if accepted else ''}")

    def adapt(self, class_counts: list[int]) -> list[str]:
        return []

    def stage_identity(self, stage: str) -> dict:
        """The default is safe: a method that overrides a hook of ``stage`` is keyed by its class
        and every hyper-parameter; one that overrides none adds nothing (and shares the stage)."""
        overridden = [hook for hook in STAGE_HOOKS[stage]
                      if getattr(type(self), hook) is not getattr(Method, hook)]
        if not overridden:
            return {}
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "hyperparameters": self.hyperparameters()}

    # Stages -------------------------------------------------------------------------------
    def prepare_training_set(self, cell: "Cell", train: "ImageSet") -> "ImageSet":
        return train

    def training_set_artifacts(self, cell: "Cell", real: "ImageSet", combined: "ImageSet",
                               folder) -> None:
        """Files (written into ``folder``) that show the training set, e.g. a PNG of real and
        synthetic images; logged under ``training_set/`` of every run that uses it."""

    def build_model(self, cell: "Cell", model: "Classifier") -> "Classifier":
        return model

    def train_step(self, cell: "Cell") -> Callable[..., "torch.Tensor"]:
        return plain_step

    def on_epoch_end(self, cell: "Cell", phase: str, epoch: int, record: dict) -> None:
        pass

    def phase2_outputs(self, cell: "Cell", phase1) -> dict[str, "np.ndarray"]:
        return {}

    def embedding_resampler(self, random_state: int) -> Any | None:
        return None

    def retrains_head(self) -> bool:
        return self.embedding_resampler(0) is not None

    def head_step(self, cell: "Cell") -> Callable[..., "torch.Tensor"]:
        return plain_step

    def head_training(self, cell: "Cell", phase1, plan: "HeadTraining") -> "HeadTraining":
        return plan

    def final_head(self, cell: "Cell", head: "torch.nn.Module",
                   val_bac: Callable[["torch.nn.Module"], float]) -> "torch.nn.Module":
        return head

    def on_cell_end(self, cell: "Cell", results: dict) -> None:
        pass

    # Scheduling -------------------------------------------------------------------------------
    def phase1s_used(self, cfg: "RunConfig") -> list["RunConfig"]:
        """Other cells whose phase 1 a cell of this method uses when it trains its own (and
        trains, when the store lacks it): a grid claims them with the cell, so that two
        workers never train one twice."""
        return []


@dataclass
class HeadTraining:
    """What phase 3 fits: ``module`` (embeddings -> logits; its parameters with
    ``requires_grad`` are trained) on ``batches`` (a :class:`benchmark.train.TensorBatches`
    or one that behaves like it) under ``schedule``; the fitted module is the final head."""

    module: "torch.nn.Module"
    batches: "TensorBatches"
    schedule: "Schedule"


@METHODS.register("none")
class Plain(Method):
    """The phase-1 model as trained, evaluated without any resampling."""


class SamplerMethod(Method):
    """A method built around an imbalanced-learn style sampler class.

    ``sampler`` is ``"module:Class"``, imported on first use (imbalanced-learn costs a second
    of start-up that ``list`` need not pay); ``fixed`` are constructor arguments the method
    pins; the rest of the constructor's keyword arguments are the method's parameters, checked
    by the sampler's own ``_parameter_constraints``.  ``neighbour_params`` name parameters
    that count neighbours inside one class: they are clamped to what the smallest class to
    over-sample has, as imbalanced-learn users do, and a class of one image is refused.
    """

    sampler: str
    fixed: dict = {}
    neighbour_params: tuple[str, ...] = ()
    RESERVED = ("random_state", "sampling_strategy", "n_jobs", "device")

    def sampler_class(self) -> Any:
        module, name = self.sampler.split(":")
        return getattr(importlib.import_module(module), name)

    def accepted_params(self) -> set[str]:
        signature = inspect.signature(self.sampler_class().__init__)
        return {p for p in signature.parameters if p != "self"} - set(self.fixed) - set(
            self.RESERVED)

    def hyperparameters(self) -> dict:
        values = self.sampler_class()(**self.fixed, **self.params).get_params(deep=False)
        return {k: v for k, v in values.items()
                if k not in self.RESERVED and k not in self.fixed}

    def validate(self) -> None:
        self.check_names()
        sampler = self.sampler_class()(**self.fixed, **self.params)
        try:
            sampler._validate_params()
        except (ValueError, TypeError) as err:
            raise UserError(f"method '{self.name}': {one_line(err)}") from None

    def adapt(self, class_counts: list[int]) -> list[str]:
        if not self.neighbour_params:
            return []
        largest = max(class_counts)
        smallest = min(n for n in class_counts if n < largest) if len(set(class_counts)) > 1 \
            else largest
        if smallest < 2:
            raise UserError(f"method '{self.name}' needs at least 2 training images in every "
                            f"class it over-samples; the smallest has {smallest} (lower the "
                            f"imbalance ratio or use a method without neighbours, e.g. eos)")
        notes = []
        for name in self.neighbour_params:
            value = self.hyperparameters()[name]
            if isinstance(value, int) and value > smallest - 1:
                self.params[name] = smallest - 1
                notes.append(f"{name} clamped from {value} to {smallest - 1}: the smallest "
                             f"class to over-sample has {smallest} training images")
        self.notes.extend(notes)
        return notes

    def make_sampler(self, random_state: int) -> Any:
        return self.sampler_class()(random_state=random_state, **self.fixed, **self.params)


class EmbeddingResampling(SamplerMethod):
    """Phase 3: resample the training embeddings with ``sampler`` and retrain the head."""

    def embedding_resampler(self, random_state: int) -> Any:
        return self.make_sampler(random_state)


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
