"""Generative over-samplers (EOS paper, Table III, plus DeepSMOTE): cgan, bagan, gamo, deepsmote.

Each trains a generator on the long-tailed training subset only (never validation or test
images), generates ``n_max - n_c`` images per class and hands phase 1 the real images plus
these, as the pixel-space samplers do.  The generator is the method's training-set stage:
keyed by the method's class and every hyper-parameter but ``frechet`` (a figure's switch)
plus the subset, so a second training seed or another loss on the same subset reuses it (its
random streams use the subset seed).

Architecture (one family shared by all four, :class:`Generator` / :class:`Discriminator`):
DCGAN-style, working at ``S`` = the nearest power of two at or above the image size (8, 28 ->
32, 32, 64); real images are resized to ``S`` (bilinear) and generated ones back to the image
size.  The generator maps a latent (plus a one-hot class, when conditional) to ``width * 2^k``
channels at 4x4 and doubles the size with transposed convolutions until ``S`` (tanh output);
the discriminator mirrors it with stride-2 convolutions down to 4x4.  The encoder of
bagan/deepsmote is the discriminator body with a linear layer to the latent; the decoder is
the generator without a class input.

Scale rule (``epochs="auto"``, ``batch_size="auto"``): a training subset of fewer than
``PAPER_SCALE_IMAGES`` (10,000) images (digits, mnist5k, the smoke studies) trains
``SMALL_EPOCHS`` (30) epochs with batch 64, sized for under 2 minutes per generator on 2 CPU
cores on mnist5k (1,337 images; 5 epochs left cgan's samples pure noise); larger subsets
(CIFAR-10/100-LT, SVHN-LT, CelebA-5) train ``PAPER_EPOCHS`` epochs at each method's published
batch size (METHODS.md: GAMO 32, BAGAN 128; DCGAN's 64 for cgan; DeepSMOTE's 100).  Learning
rates are the published ones at every scale (Adam, beta1 0.5).  METHODS.md gives no epoch
counts: 50 is our choice, said as such.

Quality figure (``frechet=True``, the default; ``frechet=False`` skips it): after phase 1,
the Frechet distance, per class, between the real training images and the generated ones,
measured in the embedding space of the ``none`` model's extractor for the same cell (same
dataset, ratio, backbone, loss, seed and protocol: the phase 1 a ``--method none`` run of the
cell trains).  That phase 1 comes from the stage cache; where the store lacks it, the method
runs the ``none`` cell (a run of its own, nested in this one and tagged ``made_for_run``), so
that a later ``--method none`` run reuses it.  Each distance fits a Gaussian to the pooled
embeddings (64 numbers for ResNet-32) of at least two images per side.  This is NOT the
Inception FID: the embedding is a small CNN trained on this very imbalanced subset, so compare
values only within one cell (dataset, image size, backbone, loss, seed), never with published
FIDs.  Beside each class's bar, the distance between two halves of its real images shows what
sampling noise alone gives.  A run whose whole phase 1 is reused from another run (the same
method, seed and loss again) computes no figure: that run holds it.

What a run logs (names in ``benchmark/schema.py``): under ``training_set/``, ``samples.png``
(real beside generated, per class), ``frechet.png`` and ``frechet.json``; the metrics
``generator/frechet_mean`` and ``class/frechet_<c>`` per class, the tag
``frechet_phase1_run_id`` (the ``none`` run whose extractor embedded them); only in the run
that trained the generator: the per-epoch losses as ``generator/<loss>`` metrics at ``step`` =
epoch, logged as they come (bagan and deepsmote count the autoencoder's epochs first, as
``generator/ae_loss``), ``generator.json`` (the settings in force and the loss history) and
the checkpoint ``generator.pt``.  The generator's seconds (training and generating) are
``time/generator_s``, carved out of the training-set stage's ``time/training_set_s`` (which
keeps the rest: the runtime total counts each second once).  A run that reuses the stage
(another training seed or loss) logs the figures, the ``time/generator_s`` the stage recorded
in the run that trained it, and the tag ``training_set_run_id`` naming that run (its
description says the training set was reused).

Failure modes: a non-finite generator or discriminator loss, or generated images of a class
with near-zero variance across samples (mode collapse), raise ``DivergenceError``.  The
training-set stage runs inside the cell's MLflow run, so such a failure ends that run FAILED
with the reason in its ``failure_reason`` tag (and the losses up to it), and the CLI exits 1.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from benchmark import schema
from benchmark.cell import stream_seed
from benchmark.data import ImageSet
from benchmark.errors import DivergenceError, UserError, one_line
from benchmark.methods import Method
from benchmark.registry import METHODS

PAPER_SCALE_IMAGES = 10_000
SMALL_EPOCHS = 30
PAPER_EPOCHS = 50
SMALL_BATCH = 64
# Mode collapse: the mean per-pixel standard deviation (pixels in [0, 1]) of a class's
# generated images below this means they are (nearly) all the same image.
COLLAPSE_STD = 1e-3


# Architecture ---------------------------------------------------------------------------------
def working_size(image_size: int) -> int:
    """The power of two (at least 8) the networks work at."""
    return max(8, 2 ** math.ceil(math.log2(image_size)))


def to_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float in [-1, 1] at ``size`` x ``size``."""
    x = images.float() / 127.5 - 1.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def to_uint8(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Float in [-1, 1] at the working size -> uint8 at the image size."""
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Generator(nn.Module):
    """DCGAN generator: ``(z, one-hot class or nothing)`` -> image in [-1, 1] at ``size``."""

    def __init__(self, latent: int, channels: int, size: int, width: int, classes: int = 0):
        super().__init__()
        self.latent, self.classes = latent, classes
        stages = int(math.log2(size)) - 2
        start = width * 2 ** (stages - 1) if stages else width
        self.project = nn.Sequential(nn.Linear(latent + classes, start * 16),
                                     nn.BatchNorm1d(start * 16), nn.ReLU(True))
        self.start = start
        layers: list[nn.Module] = []
        c = start
        for i in range(stages):
            out = channels if i == stages - 1 else c // 2
            layers.append(nn.ConvTranspose2d(c, out, 4, 2, 1, bias=i == stages - 1))
            if i < stages - 1:
                layers += [nn.BatchNorm2d(out), nn.ReLU(True)]
            c = out
        if not stages:
            layers.append(nn.Conv2d(c, channels, 3, 1, 1))
        self.body = nn.Sequential(*layers, nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.classes:
            z = torch.cat([z, F.one_hot(labels, self.classes).float()], 1)
        return self.body(self.project(z).view(len(z), self.start, 4, 4))


class Discriminator(nn.Module):
    """DCGAN discriminator body (image at ``size`` -> ``features``) with a linear head of
    ``outputs``; with ``classes``, a projection term makes it class-conditional."""

    def __init__(self, channels: int, size: int, width: int, outputs: int = 1,
                 classes: int = 0, pool: bool = False):
        super().__init__()
        stages = int(math.log2(size)) - 2
        layers: list[nn.Module] = []
        c = channels
        for i in range(max(stages, 1)):
            out = width * 2 ** i
            layers += [nn.Conv2d(c, out, 4 if stages else 3, 2 if stages else 1, 1),
                       nn.LeakyReLU(0.2, True)]
            c = out
        layers.append(nn.AdaptiveAvgPool2d(1) if pool else nn.Identity())
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.features = c if pool else c * 16
        self.head = nn.Linear(self.features, outputs)
        self.embed = nn.Embedding(classes, self.features) if classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x)
        out = self.head(h)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(1, keepdim=True)
        return out


class Encoder(nn.Module):
    """The discriminator body with a linear layer to the latent code."""

    def __init__(self, channels: int, size: int, width: int, latent: int):
        super().__init__()
        self.net = Discriminator(channels, size, width, outputs=latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Training helpers -----------------------------------------------------------------------------
def adam(module: nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))


def batches(n: int, batch_size: int, rng: torch.Generator):
    """Shuffled index batches over all ``n`` images (classes mixed: a class with fewer images
    than a batch still trains); the last, smaller batch is kept unless it has one image
    (batch norm needs two)."""
    order = torch.randperm(n, generator=rng)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        if len(index) > 1 or n == 1:
            yield index


def check_finite(method: str, epoch: int, losses: dict[str, float]) -> None:
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        values = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise DivergenceError(f"method '{method}': the generator's training diverged at epoch "
                              f"{epoch + 1} (non-finite {values})")


def check_collapse(method: str, images: torch.Tensor, labels: torch.Tensor,
                   classes: list[str]) -> None:
    """Mode collapse: a class whose generated images (two or more) barely vary."""
    for c in labels.unique().tolist():
        own = images[labels == c].float() / 255.0
        if len(own) >= 2 and own.std(0).mean().item() < COLLAPSE_STD:
            raise DivergenceError(f"method '{method}': mode collapse, the {len(own)} generated "
                                  f"images of class '{classes[c]}' are (nearly) identical "
                                  f"(mean pixel std {own.std(0).mean().item():.2g})")


GENERATE_CHUNK = 1024  # images per forward pass when generating (CIFAR-10-LT wants 37,594)


def in_chunks(net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``net(*inputs)`` computed ``GENERATE_CHUNK`` rows at a time (evaluation mode)."""
    return torch.cat([net(*(t[i:i + GENERATE_CHUNK] for t in inputs))
                      for i in range(0, len(inputs[0]), GENERATE_CHUNK)])


def deficits(labels: torch.Tensor, num_classes: int) -> list[int]:
    counts = torch.bincount(labels, minlength=num_classes)
    return (counts.max() - counts).tolist()


def wanted_labels(deficit: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(deficit)]) \
        if sum(deficit) else torch.zeros(0, dtype=torch.int64)


POSITIVE_INT = [Interval(numbers.Integral, 1, None, closed="left")]
AUTO_OR_POSITIVE_INT = [StrOptions({"auto"}), *POSITIVE_INT]
LEARNING_RATE = [Interval(numbers.Real, 0, None, closed="neither")]
# What every generative method adds to its own parameters: whether to measure the Frechet
# figure (reporting only: not part of the generator's cache key).
REPORTING_DEFAULTS = {"frechet": True}
REPORTING_CONSTRAINTS = {"frechet": ["boolean"]}


# Methods --------------------------------------------------------------------------------------
class GenerativeOverSampler(Method):
    """Base of the generative over-samplers: the training-set stage and its figures.

    Subclasses implement ``train_and_generate(x, labels, num_classes, wanted, rng, channels)``:
    train on ``x`` (the real images in [-1, 1] at the working size) and return one generated
    image per entry of ``wanted`` (class labels), in the same form; ``self.plan`` holds the
    settings in force, ``rng`` is the only random stream to draw from, and each epoch's mean
    losses go through ``self.record`` (which raises on a non-finite one).
    """

    paper_batch: int = 64  # the published batch size, used at paper scale
    # The cell whose model embeds the images for the Frechet figure: this cell's plain model.
    frechet_method = "none"

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.history: list[dict[str, float]] = []
        self.checkpoint: dict | None = None
        self.plan: dict = {}
        self.progress = False  # one line per generator epoch on stderr
        self.on_record = None  # called with (step, losses) after every epoch (the run's log)

    def accepted_params(self) -> set[str]:
        return set(self.defaults) | set(REPORTING_DEFAULTS)

    def hyperparameters(self) -> dict:
        return {**self.defaults, **REPORTING_DEFAULTS, **self.params}

    def validate(self) -> None:
        super().validate()
        from sklearn.utils._param_validation import validate_parameter_constraints

        try:
            validate_parameter_constraints(REPORTING_CONSTRAINTS, self.hyperparameters(),
                                           caller_name=self.name)
        except (ValueError, TypeError) as err:
            raise UserError(f"method '{self.name}': {one_line(err)}") from None

    def stage_identity(self, stage: str) -> dict:
        """The generator's parameters only: switching the figure off keeps the generator."""
        identity = super().stage_identity(stage)
        if "hyperparameters" in identity:
            identity["hyperparameters"] = {k: v for k, v in identity["hyperparameters"].items()
                                           if k not in REPORTING_DEFAULTS}
        return identity

    def resolved(self, n_images: int) -> dict:
        """The settings in force for a training subset of ``n_images`` (the scale rule)."""
        values = {k: v for k, v in self.hyperparameters().items()
                  if k not in REPORTING_DEFAULTS}
        paper = n_images >= PAPER_SCALE_IMAGES
        if values.get("epochs") == "auto":
            values["epochs"] = PAPER_EPOCHS if paper else SMALL_EPOCHS
        if values.get("batch_size") == "auto":
            values["batch_size"] = self.paper_batch if paper else SMALL_BATCH
        values["batch_size"] = max(2, min(values["batch_size"], n_images))
        return values

    def generate(self, train: ImageSet, seed: int, device: torch.device | str = "cpu"
                 ) -> ImageSet:
        """The synthetic images (``n_max - n_c`` of each class c) for ``train``; deterministic
        given ``seed``; the global random state is left untouched."""
        self.history = []
        size, channels = train.images.shape[-1], train.images.shape[1]
        self.plan = {**self.resolved(len(train)), "working_size": working_size(size)}
        wanted = wanted_labels(deficits(train.labels, train.num_classes))
        rng = torch.Generator().manual_seed(stream_seed(seed, f"generator/{self.name}"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, f"generator-init/{self.name}"))
            x = to_unit(train.images, self.plan["working_size"]).to(device)
            fake = self.train_and_generate(x, train.labels.to(device), train.num_classes,
                                           wanted.to(device), rng, channels)
        images = to_uint8(fake.detach().cpu(), size) if len(wanted) else \
            torch.zeros((0, *train.images.shape[1:]), dtype=torch.uint8)
        check_collapse(self.name, images, wanted, train.classes)
        return ImageSet(images, wanted, train.classes)

    def train_and_generate(self, x, labels, num_classes, wanted, rng, channels):
        raise NotImplementedError

    def record(self, epoch: int, losses: dict[str, float]) -> None:
        check_finite(self.name, epoch, losses)
        if self.on_record is not None:
            self.on_record(len(self.history), losses)
        self.history.append(losses)
        if self.progress:
            print(f"{self.name} generator epoch {len(self.history)}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), file=sys.stderr)

    # Stage hooks --------------------------------------------------------------------------
    def prepare_training_set(self, cell, train: ImageSet) -> ImageSet:
        """Train the generator (its losses into the run as they come), time it as the
        ``generator`` sub-stage, and add its images to the real ones."""
        self.progress = cell.progress
        self.on_record = lambda step, losses: cell.log_metrics(
            {schema.generator_metric(k): v for k, v in losses.items()}, step=step)
        start = time.perf_counter()
        synthetic = self.generate(train, cell.cfg.subset_seed, cell.device)
        cell.timings[schema.GENERATOR_STAGE] = time.perf_counter() - start
        return ImageSet(torch.cat([train.images, synthetic.images]),
                        torch.cat([train.labels, synthetic.labels]), train.classes)

    def training_set_artifacts(self, cell, real: ImageSet, combined: ImageSet,
                               folder: Path) -> None:
        """Always: the sample grid.  Only when the generator was trained in this process
        (not for a stage reused from another run): the settings in force with the loss
        history, and the checkpoint."""
        from baselines.pixel import plot_sample_grid

        n = len(real)
        plot_sample_grid(real.images, real.labels, combined.images[n:], combined.labels[n:],
                         real.classes, folder / "samples.png")
        if self.history:
            (folder / "generator.json").write_text(json.dumps(
                {"settings": self.plan, "history": self.history}, indent=1, default=str))
            if self.checkpoint is not None:
                torch.save(self.checkpoint, folder / "generator.pt")

    def phase1s_used(self, cfg) -> list:
        """The ``none`` cell of ``cfg``, whose extractor the Frechet figure embeds in."""
        if not self.hyperparameters()["frechet"]:
            return []
        return [dataclasses.replace(cfg, method=self.frechet_method, method_params={})]

    def on_cell_end(self, cell, results: dict) -> None:
        """The Frechet figure, in the embedding of this cell's ``none`` model (see the module's
        docstring); nothing where it is switched off or phase 1 was reused whole."""
        combined = results.get("training_set")
        if not self.hyperparameters()["frechet"] or combined is None:
            return
        from benchmark.pipeline import embed, phase1_extractor, phase1_of

        (plain,) = self.phase1s_used(cell.cfg)
        phase1 = phase1_of(plain, cell, progress=cell.progress,
                           evaluate_test="metrics" in results,  # a tuning trial's stays blind
                           tags={"made_for_run": cell.run.run_id})
        extractor = phase1_extractor(cell, phase1)
        real, n = cell.data.train, len(cell.data.train)
        synthetic = ImageSet(combined.images[n:], combined.labels[n:], real.classes)
        features = {"real": embed(cell, extractor, real.images),
                    "generated": embed(cell, extractor, synthetic.images)}
        real_y, fake_y = real.labels.numpy(), synthetic.labels.numpy()
        distances = frechet_per_class(features["real"], real_y, features["generated"], fake_y,
                                      real.num_classes)
        halves = np.arange(n) % 2 == 0
        reference = frechet_per_class(features["real"][halves], real_y[halves],
                                      features["real"][~halves], real_y[~halves],
                                      real.num_classes)
        with tempfile.TemporaryDirectory() as tmp:
            plot_frechet(distances, reference, real.classes, Path(tmp, "frechet.png"))
            Path(tmp, "frechet.json").write_text(json.dumps({
                "generated_vs_real": {real.classes[c]: d for c, d in distances.items()},
                "real_half_vs_real_half": {real.classes[c]: d for c, d in reference.items()},
                "embedding": f"pooled features of the '{self.frechet_method}' model of this "
                             f"cell (run {phase1.run_id}); not Inception"}, indent=1))
            cell.run.log_artifacts(tmp, "training_set")
        cell.run.set_tags({"frechet_phase1_run_id": phase1.run_id})
        finite = {c: d for c, d in distances.items() if math.isfinite(d)}
        metrics = {schema.class_frechet(c): d for c, d in finite.items()}
        if finite:
            metrics[schema.FRECHET_MEAN] = float(np.mean(list(finite.values())))
        cell.log_metrics(metrics)


@METHODS.register("cgan")
class ConditionalGAN(GenerativeOverSampler):
    """Conditional GAN: one class-conditional DCGAN makes the missing images (paper: SA-CGAN).

    A class-conditional DCGAN (one generator shared by all classes, one-hot class input;
    projection discriminator), the stand-in for the EOS paper's CGAN (SA-CGAN, one generator
    per class): no public code of that variant exists, and one shared conditional generator
    is how conditional GANs are normally trained (C separate GANs would multiply the cost by
    the number of classes and starve the rarest classes of data)."""

    defaults = {"epochs": "auto", "batch_size": "auto", "lr": 2e-4, "latent": 100, "width": 32}
    parameter_constraints = {"epochs": AUTO_OR_POSITIVE_INT, "batch_size": AUTO_OR_POSITIVE_INT,
                             "lr": LEARNING_RATE, "latent": POSITIVE_INT, "width": POSITIVE_INT}
    paper_batch = 64

    def train_and_generate(self, x, labels, num_classes, wanted, rng, channels):
        p, size, device = self.plan, self.plan["working_size"], x.device
        gen = Generator(p["latent"], channels, size, p["width"], num_classes).to(device)
        disc = Discriminator(channels, size, p["width"], 1, num_classes).to(device)
        opt_g, opt_d = adam(gen, p["lr"]), adam(disc, p["lr"])
        for epoch in range(p["epochs"]):
            totals = {"d_loss": 0.0, "g_loss": 0.0}
            steps = 0
            for index in batches(len(x), p["batch_size"], rng):
                real, y = x[index], labels[index]
                n = len(index)
                z = torch.randn(n, p["latent"], generator=rng).to(device)
                y_fake = torch.randint(num_classes, (n,), generator=rng).to(device)
                fake = gen(z, y_fake)
                d_loss = F.binary_cross_entropy_with_logits(disc(real, y), torch.ones(n, 1,
                                                            device=device)) + \
                    F.binary_cross_entropy_with_logits(disc(fake.detach(), y_fake),
                                                       torch.zeros(n, 1, device=device))
                descend(d_loss, opt_d)
                g_loss = F.binary_cross_entropy_with_logits(disc(fake, y_fake),
                                                            torch.ones(n, 1, device=device))
                descend(g_loss, opt_g)
                totals["d_loss"] += d_loss.item()
                totals["g_loss"] += g_loss.item()
                steps += 1
            self.record(epoch, {k: v / steps for k, v in totals.items()})
        self.checkpoint = {"generator": gen.state_dict(), "settings": self.plan}
        gen.eval()
        with torch.no_grad():
            z = torch.randn(len(wanted), p["latent"], generator=rng).to(device)
            return in_chunks(gen, z, wanted) if len(wanted) else x[:0]


def descend(loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
    """One gradient step of ``optimizers`` on ``loss``."""
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()


def train_autoencoder(method: GenerativeOverSampler, x, rng, channels, epochs: int,
                      prefix: str = "ae"):
    """Encoder/decoder trained on reconstruction (mean squared error), losses recorded."""
    p, size, device = method.plan, method.plan["working_size"], x.device
    encoder = Encoder(channels, size, p["width"], p["latent"]).to(device)
    decoder = Generator(p["latent"], channels, size, p["width"]).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=p["ae_lr"],
                           betas=(0.5, 0.999))
    for epoch in range(epochs):
        total, steps = 0.0, 0
        for index in batches(len(x), p["batch_size"], rng):
            loss = F.mse_loss(decoder(encoder(x[index])), x[index])
            descend(loss, opt)
            total += loss.item()
            steps += 1
        method.record(epoch, {f"{prefix}_loss": total / steps})
    encoder.eval()
    decoder.eval()
    return encoder, decoder


@torch.no_grad()
def encode(encoder: Encoder, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([encoder(x[i:i + batch]) for i in range(0, len(x), batch)])


@METHODS.register("deepsmote")
class DeepSMOTE(GenerativeOverSampler):
    """DeepSMOTE (Dablain et al.): SMOTE (k = 5) in an autoencoder's latent space, decoded.

    An encoder/decoder trained on reconstruction, SMOTE with
    ``k_neighbors`` (5) in its latent space within each class, the synthetic codes decoded.
    (METHODS.md names only the reconstruction loss; the original's extra permutation penalty
    is not used.)"""

    defaults = {"epochs": "auto", "batch_size": "auto", "ae_lr": 2e-4, "latent": 100,
                "width": 32, "k_neighbors": 5}
    parameter_constraints = {"epochs": AUTO_OR_POSITIVE_INT, "batch_size": AUTO_OR_POSITIVE_INT,
                             "ae_lr": LEARNING_RATE, "latent": POSITIVE_INT,
                             "width": POSITIVE_INT, "k_neighbors": POSITIVE_INT}
    paper_batch = 100

    def adapt(self, class_counts: list[int]) -> list[str]:
        return refuse_single_image_classes(self, class_counts)

    def train_and_generate(self, x, labels, num_classes, wanted, rng, channels):
        p = self.plan
        encoder, decoder = train_autoencoder(self, x, rng, channels, p["epochs"])
        self.checkpoint = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                           "settings": p}
        codes = encode(encoder, x)
        out = []
        with torch.no_grad():
            for c in range(num_classes):
                n = int((wanted == c).sum())
                if not n:
                    continue
                own = codes[labels == c]
                k = min(p["k_neighbors"], len(own) - 1)
                distances = torch.cdist(own, own)
                distances.fill_diagonal_(float("inf"))
                neighbours = distances.topk(k, largest=False).indices
                base = torch.randint(len(own), (n,), generator=rng).to(x.device)
                pick = neighbours[base, torch.randint(k, (n,), generator=rng).to(x.device)]
                gap = torch.rand(n, 1, generator=rng).to(x.device)
                out.append(in_chunks(decoder, own[base] + gap * (own[pick] - own[base])))
        return torch.cat(out) if out else x[:0]


def refuse_single_image_classes(method: Method, class_counts: list[int]) -> list[str]:
    largest = max(class_counts)
    small = [n for n in class_counts if n < largest]
    if small and min(small) < 2:
        raise UserError(f"method '{method.name}' combines images of one class and needs at "
                        f"least 2 training images in every class it over-samples; the smallest "
                        f"has {min(small)} (lower the imbalance ratio)")
    return []


@METHODS.register("bagan")
class BalancingGAN(GenerativeOverSampler):
    """BAGAN (Mariani et al.): an autoencoder-initialised conditional GAN makes missing images.

    An autoencoder is pretrained first; the generator starts as its
    decoder and the discriminator's body as its encoder, with C + 1 outputs (C classes +
    fake); class-conditional latents drawn from a Gaussian per class fitted on the codes."""

    defaults = {"epochs": "auto", "ae_epochs": "auto", "batch_size": "auto", "lr": 5e-5,
                "ae_lr": 5e-5, "latent": 100, "width": 32}
    parameter_constraints = {"epochs": AUTO_OR_POSITIVE_INT, "ae_epochs": AUTO_OR_POSITIVE_INT,
                             "batch_size": AUTO_OR_POSITIVE_INT, "lr": LEARNING_RATE,
                             "ae_lr": LEARNING_RATE, "latent": POSITIVE_INT,
                             "width": POSITIVE_INT}
    paper_batch = 128

    def resolved(self, n_images: int) -> dict:
        values = super().resolved(n_images)
        if values["ae_epochs"] == "auto":
            values["ae_epochs"] = values["epochs"]
        return values

    def train_and_generate(self, x, labels, num_classes, wanted, rng, channels):
        p, size, device = self.plan, self.plan["working_size"], x.device
        encoder, decoder = train_autoencoder(self, x, rng, channels, p["ae_epochs"])
        codes = encode(encoder, x)
        means = torch.stack([codes[labels == c].mean(0) for c in range(num_classes)])
        factors = []
        for c in range(num_classes):
            own = codes[labels == c] - means[c]
            cov = own.T @ own / max(len(own) - 1, 1) + 1e-3 * torch.eye(p["latent"],
                                                                       device=device)
            factors.append(torch.linalg.cholesky(cov))
        factors = torch.stack(factors)

        def sample(y: torch.Tensor) -> torch.Tensor:
            z = torch.randn(len(y), p["latent"], 1, generator=rng).to(device)
            return means[y] + (factors[y] @ z).squeeze(-1)

        gen = decoder.train()
        disc = Discriminator(channels, size, p["width"], num_classes + 1).to(device)
        disc.body.load_state_dict(encoder.net.body.state_dict())
        opt_g, opt_d = adam(gen, p["lr"]), adam(disc, p["lr"])
        fake_class = num_classes
        for epoch in range(p["epochs"]):
            totals, steps = {"d_loss": 0.0, "g_loss": 0.0}, 0
            for index in batches(len(x), p["batch_size"], rng):
                n = len(index)
                y_fake = torch.randint(num_classes, (n,), generator=rng).to(device)
                with torch.no_grad():
                    z = sample(y_fake)
                fake = gen(z)
                d_loss = F.cross_entropy(disc(x[index]), labels[index]) + F.cross_entropy(
                    disc(fake.detach()), torch.full((n,), fake_class, device=device))
                descend(d_loss, opt_d)
                g_loss = F.cross_entropy(disc(fake), y_fake)
                descend(g_loss, opt_g)
                totals["d_loss"] += d_loss.item()
                totals["g_loss"] += g_loss.item()
                steps += 1
            self.record(len(self.history), {k: v / steps for k, v in totals.items()})
        self.checkpoint = {"generator": gen.state_dict(), "class_means": means,
                           "class_cholesky": factors, "settings": p}
        gen.eval()
        with torch.no_grad():
            return in_chunks(gen, sample(wanted)) if len(wanted) else x[:0]


class ConvexGenerator(nn.Module):
    """GAMO's generator: ``(z, one-hot class)`` -> a shared hidden layer -> per minority class,
    softmax weights over that class's real images; the output is their convex combination."""

    def __init__(self, latent: int, num_classes: int, sizes: dict[int, int], hidden: int = 128):
        super().__init__()
        self.latent, self.num_classes = latent, num_classes
        self.trunk = nn.Sequential(nn.Linear(latent + num_classes, hidden), nn.ReLU(True))
        self.heads = nn.ModuleDict({str(c): nn.Linear(hidden, n) for c, n in sizes.items()})

    def forward(self, z, labels, pools: dict[int, torch.Tensor]) -> torch.Tensor:
        h = self.trunk(torch.cat([z, F.one_hot(labels, self.num_classes).float()], 1))
        out = torch.empty(len(z), *next(iter(pools.values())).shape[1:], device=z.device)
        for c in labels.unique().tolist():
            rows = labels == c
            weights = torch.softmax(self.heads[str(c)](h[rows]), 1)
            out[rows] = (weights @ pools[c].flatten(1)).view(-1, *pools[c].shape[1:])
        return out


@METHODS.register("gamo")
class GenerativeAdversarialMinorityOversampling(GenerativeOverSampler):
    """GAMO (Mullick et al.): convex combinations of real minority images, adversarially.

    METHODS.md's version: a generator that outputs convex
    combinations of real minority-class images (pixels as the features, as the public MNIST
    code does), trained adversarially against a class-conditional discriminator (realistic)
    and a classifier trained on real plus generated images (hard: the generator lowers the
    classifier's probability of the intended class, through ``-log(1 - p_c)``).

    ``diversity`` (ours, not GAMO's; 0 turns it off) weighs a mode-seeking term (Mao et al.,
    2019: the inverse of how far apart two latents' images are, per unit of latent distance).
    Without it the convex generator collapses within a few epochs on mnist5k: putting all the
    weight on one real image fools the discriminator perfectly."""

    defaults = {"epochs": "auto", "batch_size": "auto", "lr": 2e-4, "latent": 100,
                "width": 32, "diversity": 1.0}
    parameter_constraints = {**ConditionalGAN.parameter_constraints,
                             "diversity": [Interval(numbers.Real, 0, None, closed="left")]}
    paper_batch = 32

    def adapt(self, class_counts: list[int]) -> list[str]:
        return refuse_single_image_classes(self, class_counts)

    def train_and_generate(self, x, labels, num_classes, wanted, rng, channels):
        p, size, device = self.plan, self.plan["working_size"], x.device
        minority = [c for c in range(num_classes) if int((wanted == c).sum())]
        if not minority:
            return x[:0]
        pools = {c: x[labels == c] for c in minority}
        gen = ConvexGenerator(p["latent"], num_classes, {c: len(v) for c, v in pools.items()}
                              ).to(device)
        disc = Discriminator(channels, size, p["width"], 1, num_classes).to(device)
        classifier = Discriminator(channels, size, p["width"], num_classes).to(device)
        opt_g, opt_d, opt_m = adam(gen, p["lr"]), adam(disc, p["lr"]), adam(classifier, p["lr"])
        choices = torch.tensor(minority, device=device)
        for epoch in range(p["epochs"]):
            totals, steps = {"d_loss": 0.0, "m_loss": 0.0, "g_loss": 0.0}, 0
            for index in batches(len(x), p["batch_size"], rng):
                n = len(index)
                real, y = x[index], labels[index]
                y_fake = choices[torch.randint(len(minority), (n,), generator=rng).to(device)]
                z = torch.randn(2, n, p["latent"], generator=rng).to(device)
                fake, twin = gen(z[0], y_fake, pools), gen(z[1], y_fake, pools)
                ones, zeros = torch.ones(n, 1, device=device), torch.zeros(n, 1, device=device)
                d_loss = F.binary_cross_entropy_with_logits(disc(real, y), ones) + \
                    F.binary_cross_entropy_with_logits(disc(fake.detach(), y_fake), zeros)
                m_loss = F.cross_entropy(classifier(torch.cat([real, fake.detach()])),
                                         torch.cat([y, y_fake]))
                descend(d_loss + m_loss, opt_d, opt_m)
                p_intended = torch.softmax(classifier(fake), 1).gather(1, y_fake[:, None])
                g_loss = F.binary_cross_entropy_with_logits(disc(fake, y_fake), ones) - \
                    torch.log1p(-p_intended.clamp(max=1 - 1e-6)).mean()
                if p["diversity"]:  # mode seeking: images as far apart as their latents
                    spread = (fake - twin).abs().mean() / (z[0] - z[1]).abs().mean()
                    g_loss = g_loss + p["diversity"] / (spread + 1e-5)
                descend(g_loss, opt_g)
                for name, value in (("d_loss", d_loss), ("m_loss", m_loss), ("g_loss", g_loss)):
                    totals[name] += value.item()
                steps += 1
            self.record(epoch, {k: v / steps for k, v in totals.items()})
        self.checkpoint = {"generator": gen.state_dict(), "settings": p}
        gen.eval()
        with torch.no_grad():
            z = torch.randn(len(wanted), p["latent"], generator=rng).to(device)
            return torch.cat([gen(z[i:i + GENERATE_CHUNK], wanted[i:i + GENERATE_CHUNK], pools)
                              for i in range(0, len(z), GENERATE_CHUNK)])


# Quality figure -------------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted on the rows of ``a`` and ``b``.  With fewer
    rows than columns the covariances are singular; as in the usual FID code, a tiny ridge
    is added where the matrix square root is not finite."""
    from scipy import linalg

    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # "singular matrix": expected, handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
        if not np.isfinite(root).all():
            ridge = 1e-6 * np.eye(len(cov_a))
            root, _ = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge), disp=False)
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def frechet_per_class(real: np.ndarray, real_labels: np.ndarray, generated: np.ndarray,
                      generated_labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Per class with at least two real and two generated embeddings (rows): their Frechet
    distance."""
    result = {}
    for c in range(num_classes):
        mine, theirs = real[real_labels == c], generated[generated_labels == c]
        if len(mine) >= 2 and len(theirs) >= 2:
            result[c] = frechet_distance(mine, theirs)
    return result


def plot_frechet(distances: dict[int, float], reference: dict[int, float], classes: list[str],
                 path: Path) -> None:
    """Bars per class: generated vs real, beside the distance between two halves of the real
    images (what sampling noise alone gives)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(classes) + 1.5), 3))
    shown = sorted(distances)
    positions = np.arange(len(shown))
    ax.bar(positions - 0.2, [distances[c] for c in shown], 0.4, color="tab:purple",
           label="generated vs real")
    ax.bar(positions + 0.2, [reference.get(c, np.nan) for c in shown], 0.4, color="tab:gray",
           label="real half vs real half")
    ax.set_xticks(positions, [classes[c] for c in shown], rotation=45, ha="right")
    ax.set_ylabel("Frechet distance")
    ax.legend(fontsize=7)
    ax.set_title("real vs generated, per class (the none model's embedding; not Inception FID)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

