"""RSG (Wang et al., CVPR 2021): the rare-class sample generator, a training-only phase-1 module.

RSG sits on the feature maps after a backbone stage.  A centre-estimation module keeps ``K``
centres per class and assigns each sample to them (``gamma``); a contrastive module learns
whether two samples share a class.  From the first learning-rate decay on, the displacement of
each frequent-class sample from its nearest centre, passed through a 3x3 convolution ``T``,
is added to a rare-class sample: new rare-class maps join the batch, with their labels, and
the rest of the network trains on both.  Losses: ``L_cls + lambda1 L_CESC + lambda2 L_MV``.

In evaluation mode the module is the identity, and it lives on the classifier (``model.rsg``),
not in the extractor, so the embeddings, the cached extractor and the final model never hold it.

Paper and public code (``variant``):

- Both, as Algorithm 1 says: L_CESC and L_MV reach only RSG's own parameters (computed on
  detached maps; the centres are updated by L_CESC alone), and the contrastive module stops
  learning once generation starts (it still passes L_MV's gradient to ``T``).
- ``paper`` (default): new samples ``T(x_freq - C) + x_rare`` are built from the live maps,
  so their classification loss also trains the backbone (Eq. 4, Algorithm 1: "grad_cls ->
  backbone"); the contrastive module is two 3x3 convolutions of 256 channels (Eq. 2).
- ``public-code``: new samples are built from detached maps (only ``T`` learns from them), and
  the contrastive module is a 1x1 then a 3x3 convolution, as the authors' code has it.  The
  code's MV loss reshapes NCHW maps to ``[-1, C]`` rows, which are not per-position channel
  vectors, and multiplies instead of taking a dot product; that defect is not reproduced:
  both variants compute Eq. 6 per position.
- L_MV's contrastive term compares ``T(x_fd-freq)`` with the frequent-class sample itself (the
  paper writes ``x^l_fd-freq``; only the sample carries the class information the term is
  meant to remove, and the code compares with the sample).
- The number of new samples is the paper's ``max(floor(beta s_freq / s_rare), 1) s_rare``: each
  rare sample of the batch is used that many times, each time with another frequent sample
  (drawn without replacement while there are enough).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from benchmark.errors import UserError
from benchmark.methods import Method
from benchmark.models import backbone_stages, insert_after_stage
from benchmark.registry import METHODS

VARIANTS = ("paper", "public-code")
# The paper's frequent-class share alpha and transfer strength beta per imbalance profile.
PROFILE_DEFAULTS = {"step": {"alpha": 0.5, "beta": 0.01}}
LONG_TAILED_DEFAULTS = {"alpha": 0.2, "beta": 1.0}


def head_classes(class_counts: list[int], alpha: float) -> list[int]:
    """The ``int(alpha * C)`` largest classes (at least one, at most all but one)."""
    n_head = min(max(int(alpha * len(class_counts)), 1), len(class_counts) - 1)
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    return sorted(order[:n_head])


def contrastive_module(channels: int, width: int, variant: str) -> nn.Sequential:
    """``h`` of Eq. 2, average pooling and the two-way linear layer (logit 1: same class)."""
    first = nn.Conv2d(2 * channels, width, 3 if variant == "paper" else 1,
                      padding=1 if variant == "paper" else 0)
    return nn.Sequential(first, nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


class RareClassSampleGenerator(nn.Module):
    """The RSG module on ``[N, channels, H, W]`` maps.  Before a training forward pass, set
    ``labels``; afterwards ``take()`` returns the labels of the (grown) batch, L_CESC and L_MV.
    ``generating`` (a buffer, so a checkpoint keeps it) switches generation on."""

    def __init__(self, channels: int, num_classes: int, head: list[int], *, centres: int = 15,
                 contrastive_channels: int = 256, beta: float = 1.0, variant: str = "paper",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.beta, self.variant = beta, variant
        self.generator = generator or torch.Generator().manual_seed(0)
        is_head = torch.zeros(num_classes, dtype=torch.bool)
        is_head[head] = True
        self.register_buffer("is_head", is_head)
        self.register_buffer("generating", torch.tensor(False))
        # Centre estimation (Eq. 1): per class a linear map of the pooled maps to K logits.
        self.assign_weight = nn.Parameter(torch.randn(num_classes, channels, centres))
        self.assign_bias = nn.Parameter(torch.ones(num_classes, centres))
        self.centres = nn.Parameter(torch.zeros(num_classes, centres, channels))
        self.contrastive = contrastive_module(channels, contrastive_channels, variant)
        self.transform = nn.Conv2d(channels, channels, 3, padding=1)  # T of Eq. 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.labels: torch.Tensor | None = None
        self._taken: tuple | None = None
        self.reset_totals()

    def reset_totals(self) -> None:
        """Running sums since the last call, for the per-epoch curves (kept on the device)."""
        self.totals: dict = {"cesc": 0.0, "mv": 0.0, "steps": 0, "generated": 0}

    def epoch_means(self) -> dict[str, float]:
        """The means of L_CESC and L_MV per step and the new samples, since the last reset."""
        steps = max(self.totals["steps"], 1)
        means = {"rsg/cesc": float(self.totals["cesc"]) / steps,
                 "rsg/mv": float(self.totals["mv"]) / steps,
                 "rsg/generated": float(self.totals["generated"])}
        self.reset_totals()
        return means

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels of the batch the rest of the network saw, L_CESC, L_MV) of the last pass."""
        taken, self._taken = self._taken, None
        if taken is None:
            raise RuntimeError("RSG saw no labelled training batch: set .labels before forward")
        return taken

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if not self.training or self.labels is None:
            return maps
        labels, self.labels = self.labels, None
        real = len(labels)
        generating = bool(self.generating)
        for parameter in self.contrastive.parameters():
            parameter.requires_grad_(not generating)
        # Distances of thousands of terms cancel badly in bfloat16: RSG computes in float32.
        with torch.autocast(maps.device.type, enabled=False):
            detached = maps.detach().float()
            gamma = self.assignments(detached, labels)
            cesc = self.cesc_loss(detached, labels, gamma, contrastive=not generating)
            mv = torch.zeros((), device=maps.device)
            if generating:
                maps, labels, mv = self.generate(maps, detached, labels, gamma)
        self._taken = (labels, cesc, mv)
        self.totals["cesc"] += cesc.detach()
        self.totals["mv"] += mv.detach()
        self.totals["steps"] += 1
        self.totals["generated"] += len(labels) - real
        return maps

    def assignments(self, detached: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """gamma of Eq. 1: each sample's soft assignment to its class's centres."""
        pooled = detached.mean((2, 3))
        logits = torch.einsum("nd,ndk->nk", pooled, self.assign_weight[labels])
        return (logits + self.assign_bias[labels]).softmax(1)

    def cesc_loss(self, detached: torch.Tensor, labels: torch.Tensor, gamma: torch.Tensor,
                  contrastive: bool) -> torch.Tensor:
        """Eq. 5: gamma-weighted squared distances to the centres (summed over channels and
        positions, averaged over the batch), plus the contrastive module's cross-entropy on
        s/2 random pairs of the batch while it still learns."""
        n, _, h, w = detached.shape
        centres = self.centres[labels]  # [n, K, D], broadcast over the positions
        squares = detached.pow(2).sum((1, 2, 3))
        cross = torch.einsum("nkd,nd->nk", centres, detached.sum((2, 3)))
        distances = (squares[:, None] - 2 * cross + h * w * centres.pow(2).sum(2)).clamp_min(0)
        loss = (gamma * distances).sum(1).mean()
        if contrastive and n >= 2:
            order = torch.randperm(n, generator=self.generator).to(labels.device)
            a, b = order[: n // 2], order[n // 2: 2 * (n // 2)]
            logits = self.contrastive(torch.cat([detached[a], detached[b]], 1)).float()
            loss = loss + F.cross_entropy(logits, (labels[a] == labels[b]).long())
        return loss

    def generate(self, maps: torch.Tensor, detached: torch.Tensor, labels: torch.Tensor,
                 gamma: torch.Tensor):
        """Eqs. 3, 4 and 6: the grown batch, its labels and L_MV."""
        head = self.is_head[labels]
        frequent, rare = torch.nonzero(head).flatten(), torch.nonzero(~head).flatten()
        if len(frequent) == 0 or len(rare) == 0:
            return maps, labels, torch.zeros((), device=maps.device)
        per_rare = max(math.floor(self.beta * len(frequent) / len(rare)), 1)
        rare_idx = rare.repeat(per_rare)
        shuffled = frequent[torch.randperm(len(frequent), generator=self.generator)
                            .to(frequent.device)]
        freq_idx = shuffled.repeat(math.ceil(len(rare_idx) / len(frequent)))[: len(rare_idx)]
        nearest = gamma.argmax(1)
        centre_freq = self.centres[labels[freq_idx], nearest[freq_idx]].detach()[..., None, None]
        centre_rare = self.centres[labels[rare_idx], nearest[rare_idx]].detach()[..., None, None]
        displacement = detached[freq_idx] - centre_freq  # x_fd-freq, Eq. 3
        rare_displacement = detached[rare_idx] - centre_rare  # x_fd-rare
        transformed = self.transform(displacement).float()  # L_MV reaches T only
        if self.variant == "paper":
            live = self.transform(maps[freq_idx].float() - centre_freq).float()
            new = live + maps[rare_idx].float()
        else:
            new = transformed + detached[rare_idx]
        collinear = (F.cosine_similarity(transformed, rare_displacement, dim=1) - 1).abs()
        length = (transformed.norm(dim=1) - displacement.norm(dim=1)).abs()
        different = self.contrastive(torch.cat([detached[freq_idx], transformed], 1)).float()
        mv = (collinear.sum((1, 2)).mean() + length.sum((1, 2)).mean()
              + F.cross_entropy(different, torch.zeros_like(freq_idx)))  # -log gamma*
        grown = torch.cat([maps, new.to(maps.dtype)])
        return grown, torch.cat([labels, labels[rare_idx]]), mv


@METHODS.register("rsg")
class RareClassSampleGeneration(Method):
    """RSG (Wang et al.): a training-only rare-class sample generator in phase 1 (+ ldam-drw).

    Its own phase 1, best with ``--loss ldam-drw``: the module after backbone ``stage``
    (default: the second-to-last, before the last down-sampling stage, where the paper places
    it: ResNet-32's 32 x 16 x 16 maps), ``centres`` per class, head classes the ``alpha``
    share of largest classes, transfer strength ``beta`` (both default to the paper's for the
    profile: 0.2 and 1.0 long-tailed, 0.5 and 0.01 step), ``lambda1`` (CESC) and ``lambda2``
    (MV), generation from the first learning-rate decay; ``variant`` is ``paper`` or
    ``public-code`` (see the module's docstring).  Per-epoch curves ``rsg/cesc``, ``rsg/mv``
    and ``rsg/generated`` (new samples).  No phase 3."""

    defaults = {"variant": "paper", "centres": 15, "alpha": None, "beta": None,
                "lambda1": 0.1, "lambda2": 0.01, "contrastive_channels": 256, "stage": None}
    parameter_constraints = {
        "variant": [StrOptions(set(VARIANTS))],
        "centres": [Interval(numbers.Integral, 1, None, closed="left")],
        "alpha": [Interval(numbers.Real, 0, 1, closed="right"), None],
        "beta": [Interval(numbers.Real, 0, 1, closed="right"), None],
        "lambda1": [Interval(numbers.Real, 0, None, closed="left")],
        "lambda2": [Interval(numbers.Real, 0, None, closed="left")],
        "contrastive_channels": [Interval(numbers.Integral, 1, None, closed="left")],
        "stage": [str, None],
    }

    module: RareClassSampleGenerator | None = None

    def settings(self, profile: str) -> dict:
        """The hyper-parameters with alpha and beta filled in for ``profile``."""
        params = self.hyperparameters()
        paper = PROFILE_DEFAULTS.get(profile, LONG_TAILED_DEFAULTS)
        return {**params, **{k: paper[k] for k in ("alpha", "beta") if params[k] is None}}

    def build_model(self, cell, model):
        params = self.settings(cell.cfg.profile)
        stages = backbone_stages(model.extractor)
        stage = params["stage"] or list(stages)[-2]
        if stage not in stages:
            raise UserError(f"method 'rsg': backbone {type(model.extractor).__name__} has no "
                            f"stage '{stage}'; its stages: {', '.join(stages)}")
        channels = stage_channels(model, stages[stage], cell)
        head = head_classes(cell.class_counts, params["alpha"])
        self.module = RareClassSampleGenerator(
            channels, cell.data.train.num_classes, head, centres=params["centres"],
            contrastive_channels=params["contrastive_channels"], beta=params["beta"],
            variant=params["variant"], generator=cell.generator("rsg"))
        self.start_epoch = cell.cfg.schedule.decay_epochs[0]
        self.module.generating.fill_(self.start_epoch <= 0)
        insert_after_stage(model, stage, self.module, "rsg")
        self.notes.append(f"RSG after {stage} ({channels} channels), head classes {head}, "
                          f"alpha {params['alpha']}, beta {params['beta']}, generation from "
                          f"epoch {self.start_epoch + 1}")
        return model

    def train_step(self, cell):
        params = self.hyperparameters()
        lambda1, lambda2, rsg = float(params["lambda1"]), float(params["lambda2"]), self.module

        def step(model, x, y, loss_fn):
            rsg.labels = y
            out = model(x)
            labels, cesc, mv = rsg.take()
            return loss_fn(out, labels) + lambda1 * cesc + lambda2 * mv

        return step

    def on_epoch_end(self, cell, phase, epoch, record):
        if phase == "phase1" and self.module is not None:
            cell.log_metrics(self.module.epoch_means(), step=epoch)
            self.module.generating.fill_(epoch >= self.start_epoch)  # epoch: 1-based, done


def stage_channels(model, stage_module, cell) -> int:
    """The channels of ``stage_module``'s output, from one forward pass of a blank image."""
    seen = []
    handle = stage_module.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    was_training = model.training
    try:
        with torch.no_grad():
            model.extractor.eval()(torch.zeros(1, cell.data.train.images.shape[1],
                                               cell.cfg.image_size, cell.cfg.image_size))
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]
