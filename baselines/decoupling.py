"""Decoupled classifiers (Kang et al., ICLR 2020) on a shared phase 1: cRT, tau-norm and LWS."""
from __future__ import annotations

import copy
import dataclasses
import numbers

import numpy as np
import torch
from sklearn.utils._param_validation import Interval
from torch import nn

from benchmark.errors import UserError
from benchmark.methods import HeadTraining, Method
from benchmark.registry import METHODS
from benchmark.train import TensorBatches


def phase1_head(cell, phase1) -> nn.Module:
    """Phase 1's own head (the loss's head type, phase 1's weights) on the cell's device."""
    head = cell.loss.make_head(phase1.summary["embedding_dim"], cell.data.train.num_classes)
    head.load_state_dict({k[len("head."):]: v for k, v in phase1.state_dict.items()
                          if k.startswith("head.")})
    return head.to(cell.device)


class ClassBalancedBatches(TensorBatches):
    """Class-balanced sampling (Kang et al.): every draw picks a class uniformly, then one of
    its examples uniformly, with replacement; an epoch is as many batches as a pass over the
    data would be."""

    def __iter__(self):
        targets = self.targets.cpu()
        order = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets)
        present = torch.nonzero(counts).flatten()
        starts = torch.cumsum(counts, 0) - counts
        for _ in range(len(self)):
            classes = present[torch.randint(len(present), (self.batch_size,),
                                            generator=self.generator)]
            # float rounding can reach the count itself: clamp onto the class's last example
            offsets = (torch.rand(self.batch_size, generator=self.generator)
                       * counts[classes]).long().minimum(counts[classes] - 1)
            idx = order[starts[classes] + offsets].to(self.inputs.device)
            x = self.inputs[idx]
            if self.transform is not None:
                x = self.transform(x, self.generator)
            yield x, self.targets[idx]


def class_balanced(batches: TensorBatches) -> ClassBalancedBatches:
    return ClassBalancedBatches(**{f.name: getattr(batches, f.name)
                                   for f in dataclasses.fields(batches)})


@METHODS.register("crt")
class ClassifierRetraining(Method):
    """cRT (Kang et al.): a fresh head retrained on class-balanced batches of the embeddings.

    Phase 3's schedule; the head recipe's start is ignored: cRT always starts from a fresh head
    (seeded with the training seed)."""

    def retrains_head(self) -> bool:
        return True

    def head_training(self, cell, phase1, plan: HeadTraining) -> HeadTraining:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cell.cfg.seed)
            fresh = cell.loss.make_head(phase1.summary["embedding_dim"],
                                        cell.data.train.num_classes)
        return dataclasses.replace(plan, module=fresh.to(cell.device),
                                   batches=class_balanced(plan.batches))


class ScaledHead(nn.Module):
    """A frozen head whose logits are multiplied by learnable per-class scales (LWS: the
    class weight vectors' norms re-learnt; the bias is scaled with them)."""

    def __init__(self, head: nn.Module, num_classes: int):
        super().__init__()
        self.head = head
        for parameter in self.head.parameters():
            parameter.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(embeddings) * self.scales


@METHODS.register("lws")
class LearnableWeightScaling(Method):
    """LWS (Kang et al.): phase 1's head frozen, one learnt scale per class (balanced batches).

    Phase 3's schedule; the scales start at 1 and multiply the head's logits."""

    def retrains_head(self) -> bool:
        return True

    def head_training(self, cell, phase1, plan: HeadTraining) -> HeadTraining:
        scaled = ScaledHead(phase1_head(cell, phase1), cell.data.train.num_classes)
        return dataclasses.replace(plan, module=scaled.to(cell.device),
                                   batches=class_balanced(plan.batches))


def tau_normalized(head: nn.Module, tau: float) -> nn.Module:
    """A copy of ``head`` whose class weight vectors ``w_c`` become ``w_c / ||w_c|| ** tau``
    (tau 0: unchanged; 1: unit norms).  The bias is kept, so tau 0 is exactly the head."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise UserError(f"tau-norm needs a head with a [classes, features] weight matrix; "
                        f"{type(head).__name__} has none")
    scaled = copy.deepcopy(head)
    with torch.no_grad():
        norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        scaled.weight.copy_(weight / norms.pow(tau))
    return scaled


@METHODS.register("tau-norm")
class TauNormalization(Method):
    """tau-norm (Kang et al.): phase 1's class weights divided by their norms ** tau, no phase 3.

    ``tau`` None (default) picks it on validation BAC
    over ``grid_size`` evenly spaced values in [0, 2] (the smallest of equal scores), logged as
    ``tau_norm/tau`` with the curve ``tau_norm/val_bac`` (step = 100 tau); a number fixes it.
    Kang et al. drop the bias; it is kept here, so that tau 0 is exactly phase 1's head.  A
    head that normalises its weights itself (LDAM's cosine head) is unchanged by every tau."""

    defaults = {"tau": None, "grid_size": 21}
    parameter_constraints = {"tau": [Interval(numbers.Real, 0, None, closed="left"), None],
                             "grid_size": [Interval(numbers.Integral, 2, None, closed="left")]}

    def final_head(self, cell, head, val_bac):
        params = self.hyperparameters()
        if not isinstance(head, nn.Linear):
            self.notes.append(f"the head ({type(head).__name__}) is not a plain linear layer; "
                              f"if it normalises its weights itself, tau changes nothing")
        if params["tau"] is not None:
            tau = float(params["tau"])
        else:
            grid = np.linspace(0.0, 2.0, int(params["grid_size"]))
            scores = [val_bac(tau_normalized(head, float(t))) for t in grid]
            for t, score in zip(grid, scores):
                cell.log_metrics({"tau_norm/val_bac": score}, step=int(round(100 * t)))
            tau = float(grid[int(np.argmax(scores))])
        cell.log_metrics({"tau_norm/tau": tau})
        self.chosen_tau = tau
        return tau_normalized(head, tau)
