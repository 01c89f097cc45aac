"""Mixup and Remix (rebalanced mixup) as phase-1 training steps, with any loss of the registry."""
from __future__ import annotations

import numbers

import torch
from sklearn.utils._param_validation import Interval

from baselines.mixup import mix_inputs, mixup_label_weights, remix_label_weights, sample_lambda
from benchmark.methods import Method
from benchmark.registry import METHODS


class Mixing(Method):
    """Each phase-1 batch is mixed with a shuffled copy of itself, ``lam ~ Beta(alpha, alpha)``
    drawn once per batch; the loss is the label-weight form ``w * L(y_a) + (1 - w) * L(y_b)``
    (``Loss.mixed``), which works for every loss (class weights and DRW included).  Draws come
    from the cell's own ``mixup`` random stream, so batches and augmentation are those of the
    plain run.  No phase 3: the phase-1 model is evaluated as trained."""

    defaults = {"alpha": 1.0}
    parameter_constraints = {"alpha": [Interval(numbers.Real, 0, None, closed="neither")]}

    def label_weights(self, lam: float, y_a: torch.Tensor, y_b: torch.Tensor):
        return mixup_label_weights(lam, len(y_a), device=y_a.device)

    def train_step(self, cell):
        generator = cell.generator("mixup")
        alpha = float(self.hyperparameters()["alpha"])
        self.class_counts = torch.tensor(cell.class_counts, device=cell.device)

        def step(model, x, y, loss_fn):
            lam = sample_lambda(alpha, generator)
            perm = torch.randperm(len(y), generator=generator).to(y.device)
            out = model(mix_inputs(x, perm, lam))
            return loss_fn.mixed(out, y, y[perm], self.label_weights(lam, y, y[perm]))

        return step


@METHODS.register("mixup")
class Mixup(Mixing):
    """Mixup (Zhang et al.) in phase 1: inputs and labels mixed with lambda ~ Beta(1, 1)."""


@METHODS.register("remix")
class Remix(Mixing):
    """Remix (Chou et al., rebalanced mixup): a mixed pair's label goes to its minority class.

    The label weight is 0 when n_a / n_b >= kappa and lambda < tau, 1 when n_a / n_b <=
    1 / kappa and 1 - lambda < tau, lambda otherwise (kappa 3, tau 0.5); often with DRW
    (``--loss ce-drw``).  The EOS paper cites Bellinger et al.'s "Remix", of which no public
    code was found; this is the rebalanced-mixup rule."""

    defaults = {"alpha": 1.0, "kappa": 3.0, "tau": 0.5}
    parameter_constraints = {**Mixing.parameter_constraints,
                             "kappa": [Interval(numbers.Real, 1, None, closed="left")],
                             "tau": [Interval(numbers.Real, 0, 1, closed="both")]}

    def label_weights(self, lam: float, y_a: torch.Tensor, y_b: torch.Tensor):
        params = self.hyperparameters()
        return remix_label_weights(lam, self.class_counts[y_a], self.class_counts[y_b],
                                   kappa=float(params["kappa"]), tau=float(params["tau"]))
