"""CAM-based feature-space augmentation (Chu et al., ECCV 2020) on a shared phase 1.

Phase 2 adds the training images' last feature maps (what the embedding pools, from phase 1's
extractor) and their class activation maps: the phase-1 head's weights of the image's own
class applied at every position, normalised to [0, 1] per image.  Positions above ``tau_s``
hold class-specific features, below ``tau_g`` class-generic ones.  Phase 3 fine-tunes only the
phase-1 head on balanced batches: ``N_t`` real tail samples, ``n_augmented`` new samples per
tail sample, and as many head samples.  A new sample of tail class c mixes its specific
features with the generic features of a sample of one of c's ``n_confusing`` most confusing
classes (highest mean phase-1 softmax score on c's training samples): with a ratio ``gamma ~
U(0, 1)``, ``gamma L`` specific and ``(1 - gamma) L`` generic feature vectors are drawn (L
positions; at least one of each kind) and, since the head sees the average-pooled maps, the
new embedding is their mean.  Head classes: the largest classes covering ``head_share`` (90%)
of the training images; the rest are tail classes.

No official code exists.  Choices the paper leaves open: feature vectors are drawn uniformly
with replacement from their mask; tail and head samples are drawn uniformly from the tail and
head images; each tail sample's ``n_augmented`` donor classes run through a random order of
its confusing classes (all of them when the two counts are equal, as in Algorithm 1).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from baselines.decoupling import phase1_head
from benchmark.errors import UserError
from benchmark.methods import HeadTraining, Method
from benchmark.registry import METHODS

# The paper fine-tunes for 6,400 iterations on CIFAR; long-tailed CIFAR-10 at 100:1 has
# 12,406 training images, and other data sets get iterations in proportion to their size.
REFERENCE_ITERATIONS, REFERENCE_IMAGES = 6400, 12406


def head_and_tail(class_counts: list[int], share: float) -> tuple[list[int], list[int]]:
    """The largest classes until they cover ``share`` of the images (never every class), and
    the rest."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    total, covered, head = sum(class_counts), 0, []
    for c in order[:-1]:
        if covered >= share * total:
            break
        head.append(c)
        covered += class_counts[c]
    return sorted(head), sorted(set(order) - set(head))


def class_activation_maps(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[N, D, H, W]`` maps and one ``[N, D]`` class weight vector per map -> CAMs ``[N, H, W]``
    normalised to [0, 1] per map (a constant map becomes all zeros)."""
    cams = torch.einsum("ndhw,nd->nhw", maps, weights)
    low = cams.amin((1, 2), keepdim=True)
    spread = cams.amax((1, 2), keepdim=True) - low
    return torch.where(spread > 0, (cams - low) / spread.clamp_min(1e-12), torch.zeros_like(cams))


def cam_masks(cams: torch.Tensor, tau_s: float, tau_g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-specific (CAM > tau_s) and class-generic (CAM < tau_g) positions, ``[N, H * W]``.
    A map with no position on one side (a constant map) uses all its positions there."""
    flat = cams.flatten(1)
    specific, generic = flat > tau_s, flat < tau_g
    specific[~specific.any(1)] = True
    generic[~generic.any(1)] = True
    return specific, generic


def mixed_embeddings(maps_s: torch.Tensor, specific: torch.Tensor, maps_g: torch.Tensor,
                     generic: torch.Tensor, n_specific: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """Average-pooled mixtures: per row, ``n_specific`` feature vectors drawn from the
    ``specific`` positions of ``maps_s`` and ``L - n_specific`` from the ``generic`` positions
    of ``maps_g`` (maps ``[M, D, L]``, masks ``[M, L]`` on the CPU), averaged."""
    m, d, length = maps_s.shape
    draws_s = torch.multinomial(specific.float(), length, replacement=True, generator=generator)
    draws_g = torch.multinomial(generic.float(), length, replacement=True, generator=generator)
    positions = torch.arange(length)
    take_s = (positions[None] < n_specific[:, None]).float()
    take_g = (positions[None] < (length - n_specific)[:, None]).float()
    device = maps_s.device
    vectors_s = maps_s.gather(2, draws_s.to(device)[:, None].expand(m, d, length))
    vectors_g = maps_g.gather(2, draws_g.to(device)[:, None].expand(m, d, length))
    return ((vectors_s * take_s.to(device)[:, None]).sum(2)
            + (vectors_g * take_g.to(device)[:, None]).sum(2)) / length


@dataclasses.dataclass
class CamPrepared:
    """Phase 2's extra outputs: maps ``[N, D, L]`` (device), masks ``[N, L]`` (CPU), classes."""

    maps: torch.Tensor
    specific: torch.Tensor
    generic: torch.Tensor
    head: list[int]
    tail: list[int]
    confusing: torch.Tensor  # [C, n_confusing]: the most confusing classes of each class


class CamAugmentedBatches:
    """Phase 3's balanced, augmented batches of embeddings (behaves like ``TensorBatches``)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, prepared: CamPrepared,
                 batch_size: int, n_augmented: int, generator: torch.Generator):
        self.inputs, self.targets, self.prepared = inputs, targets, prepared
        self.batch_size, self.n_augmented, self.generator = batch_size, n_augmented, generator
        self.device_generator = None  # every draw comes from the CPU generator
        labels = targets.cpu()
        self.labels = labels
        self.tail_idx = torch.nonzero(torch.isin(labels, torch.tensor(prepared.tail))).flatten()
        self.head_idx = torch.nonzero(torch.isin(labels, torch.tensor(prepared.head))).flatten()
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=len(prepared.confusing))
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.n_tail = max(batch_size // (2 * (1 + n_augmented)), 1)

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def draw(self, pool: torch.Tensor, n: int) -> torch.Tensor:
        return pool[torch.randint(len(pool), (n,), generator=self.generator)]

    def __iter__(self):
        p, g, n_aug = self.prepared, self.generator, self.n_augmented
        length = p.maps.shape[2]
        for _ in range(len(self)):
            tail = self.draw(self.tail_idx, self.n_tail)
            tail_labels = self.labels[tail]
            n_confusing = p.confusing.shape[1]
            orders = torch.argsort(torch.rand(len(tail), n_confusing, generator=g), 1)
            picks = orders[:, torch.arange(n_aug) % n_confusing]
            donor_classes = p.confusing[tail_labels][torch.arange(len(tail))[:, None], picks]
            offsets = (torch.rand(donor_classes.shape, generator=g)
                       * self.counts[donor_classes]).long().minimum(self.counts[donor_classes] - 1)
            donors = self.order[self.starts[donor_classes] + offsets].flatten()
            sources = tail.repeat_interleave(n_aug)
            ratio = torch.rand(len(sources), generator=g)
            n_specific = (ratio * length).round().long().clamp(1, max(length - 1, 1))
            mixed = mixed_embeddings(p.maps[sources.to(p.maps.device)], p.specific[sources],
                                     p.maps[donors.to(p.maps.device)], p.generic[donors],
                                     n_specific, g)
            head = self.draw(self.head_idx, len(tail) * (1 + n_aug))
            device = self.inputs.device
            x = torch.cat([self.inputs[tail.to(device)], mixed.to(self.inputs.dtype),
                           self.inputs[head.to(device)]])
            y = torch.cat([tail_labels, tail_labels.repeat_interleave(n_aug), self.labels[head]])
            yield x, y.to(self.targets.device)


def feature_maps(extractor, images: torch.Tensor, normalize, batch_size: int = 512) -> torch.Tensor:
    """The maps ``extractor`` pools into its embedding, in evaluation mode, batched."""
    if not hasattr(extractor, "feature_maps"):
        raise UserError(f"method 'cam-aug' needs the feature maps before global pooling; "
                        f"backbone {type(extractor).__name__} does not expose them (use a "
                        f"resnet, wrn28 or densenet)")
    extractor.eval()
    with torch.no_grad():
        return torch.cat([extractor.feature_maps(normalize(images[i:i + batch_size])).float()
                          for i in range(0, len(images), batch_size)])


@METHODS.register("cam-aug")
class CamFeatureAugmentation(Method):
    """CAM-based feature augmentation (Chu et al.): phase 1's head tuned on mixed tail features.

    Phase 3 on the shared phase 1: only the phase-1 head is fine-tuned (``lr`` fixed,
    momentum 0.9, ``batch_size``, ``iterations``: None scales the paper's 6,400 CIFAR
    iterations to the training set's size; phase 3's epochs are passes of as many batches as
    the training set fills, the best on validation kept).  ``--head-epochs`` and the head
    recipe do not apply.  Extracting the maps is timed as ``time/cam_maps_s``.  See the
    module's docstring."""

    defaults = {"tau_s": 0.8, "tau_g": 0.2, "n_confusing": 3, "n_augmented": 3,
                "head_share": 0.9, "lr": 0.001, "iterations": None, "batch_size": 128}
    parameter_constraints = {
        "tau_s": [Interval(numbers.Real, 0, 1, closed="neither")],
        "tau_g": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_confusing": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_augmented": [Interval(numbers.Integral, 1, None, closed="left")],
        "head_share": [Interval(numbers.Real, 0, 1, closed="neither")],
        "lr": [Interval(numbers.Real, 0, None, closed="neither")],
        "iterations": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(numbers.Integral, 2, None, closed="left")],
    }

    prepared: CamPrepared | None = None

    def adapt(self, class_counts: list[int]) -> list[str]:
        value, most = self.hyperparameters()["n_confusing"], len(class_counts) - 1
        if value > most:
            self.params["n_confusing"] = most
            note = f"n_confusing clamped from {value} to {most}: there are {most} other classes"
            self.notes.append(note)
            return [note]
        return []

    def retrains_head(self) -> bool:
        return True

    def phase2_outputs(self, cell, phase1) -> dict[str, np.ndarray]:
        from benchmark.pipeline import final_model, normalizer  # the pipeline imports methods

        params = self.hyperparameters()
        start = time.perf_counter()
        head = phase1_head(cell, phase1)
        extractor = final_model(cell, phase1, head).extractor.to(cell.device)
        maps = feature_maps(extractor, cell.data.train.images.to(cell.device), normalizer(cell))
        labels = torch.as_tensor(phase1.embeddings["train_y"], device=cell.device)
        weight = head.weight.detach().float()
        cams = class_activation_maps(maps, weight[labels])
        specific, generic = cam_masks(cams.cpu(), params["tau_s"], params["tau_g"])
        with torch.no_grad():
            scores = head(torch.as_tensor(phase1.embeddings["train_x"], device=cell.device))
            scores = scores.float().softmax(1).cpu()
        num_classes = cell.data.train.num_classes
        mean_scores = torch.zeros(num_classes, num_classes).index_add_(0, labels.cpu(), scores)
        mean_scores /= torch.bincount(labels.cpu(), minlength=num_classes).clamp_min(1)[:, None]
        mean_scores.fill_diagonal_(-math.inf)
        confusing = mean_scores.topk(params["n_confusing"], dim=1).indices
        head_classes, tail_classes = head_and_tail(cell.class_counts, params["head_share"])
        self.prepared = CamPrepared(maps.flatten(2), specific, generic, head_classes,
                                    tail_classes, confusing)
        cell.timings["cam_maps"] = time.perf_counter() - start
        self.notes.append(f"cam-aug: tail classes {tail_classes}; their confusing classes "
                          f"{confusing[tail_classes].tolist()}")
        return {"cam": cams.cpu().numpy()}

    def head_training(self, cell, phase1, plan: HeadTraining) -> HeadTraining:
        params = self.hyperparameters()
        batches = CamAugmentedBatches(plan.batches.inputs, plan.batches.targets, self.prepared,
                                      int(params["batch_size"]), int(params["n_augmented"]),
                                      plan.batches.generator)
        iterations = params["iterations"] or max(
            1, round(REFERENCE_ITERATIONS * len(batches.targets) / REFERENCE_IMAGES))
        schedule = dataclasses.replace(plan.schedule, epochs=math.ceil(iterations / len(batches)),
                                       lr=float(params["lr"]),
                                       batch_size=int(params["batch_size"]),
                                       warmup_fraction=0.0, decay_fractions=(1.0, 1.0))
        return HeadTraining(phase1_head(cell, phase1), batches, schedule)
