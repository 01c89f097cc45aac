"""The one training loop (phase 1, phase 3 and every other fit), its schedule and batching."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from benchmark.errors import DivergenceError


@dataclass(frozen=True)
class Schedule:
    """SGD with linear warm-up and two step decays, as fractions of the epoch count.

    The paper's 200-epoch CIFAR schedule (warm-up 5, x0.01 after 160, x0.0001 after 180) is
    ``Schedule(epochs=200)``; shorter runs keep the same proportions.
    """

    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 128
    warmup_fraction: float = 5 / 200
    decay_fractions: tuple[float, float] = (160 / 200, 180 / 200)
    decay_factors: tuple[float, float] = (0.01, 0.0001)

    @property
    def warmup_epochs(self) -> int:
        return round(self.warmup_fraction * self.epochs)

    @property
    def decay_epochs(self) -> tuple[int, ...]:
        """First epoch (0-based) at which each decay applies."""
        return tuple(round(f * self.epochs) for f in self.decay_fractions)

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * (epoch + 1) / self.warmup_epochs
        factor = 1.0
        for start, decayed in zip(self.decay_epochs, self.decay_factors):
            if epoch >= start:
                factor = decayed
        return self.lr * factor

    def as_params(self, prefix: str) -> dict:
        params = {f"{prefix}{k}": v for k, v in asdict(self).items()}
        params[f"{prefix}decay_epochs"] = self.decay_epochs
        params[f"{prefix}warmup_epochs"] = self.warmup_epochs
        return params


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding and optional horizontal flip, batched, per-image draws."""

    padding: int = 4
    hflip: bool = True

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = images.shape
        p, device = self.padding, images.device
        # Offsets and flips come from a CPU generator, so CPU and CUDA see the same draws.
        dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(device)
        dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(device)
        cols = torch.arange(w, device=device).expand(n, 1, w)
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(device)
            cols = torch.where(flip[:, None, None], w - 1 - cols, cols)
        # One gather does crop and flip: each output pixel reads its source in the padded image.
        rows = dy + torch.arange(h, device=device)[None, :, None]
        source = (rows * (w + 2 * p) + dx + cols).view(n, 1, h * w).expand(n, c, h * w)
        padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
        return padded.reshape(n, c, -1).gather(2, source).view(n, c, h, w)


@dataclass
class TensorBatches:
    """Shuffled mini-batches over tensors that already live on the training device.

    ``transform`` turns a raw batch into model input (augmentation, then normalisation);
    nothing is done per image in Python.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    generator: torch.Generator
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def __iter__(self):
        order = torch.randperm(len(self.targets), generator=self.generator).to(self.inputs.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.inputs[idx]
            if self.transform is not None:
                x = self.transform(x, self.generator)
            yield x, self.targets[idx]

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    """The training step every method uses unless it brings its own (mixup, auxiliary losses)."""
    return loss_fn(model(x), y)


def fit(
    model: nn.Module,
    batches: TensorBatches,
    loss_fn: nn.Module,
    schedule: Schedule,
    validate: Callable[[], float],
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
    progress: str | None = None,
    amp: bool = False,
    step: Callable[..., torch.Tensor] = plain_step,
    generators: dict[str, torch.Generator] | None = None,
    resume: dict | None = None,
    checkpoint: Callable[[int, Callable[[], dict]], None] | None = None,
) -> FitResult:
    """Train ``model`` for ``schedule.epochs`` and leave it holding its best-on-validation
    weights (earliest epoch on ties).  ``validate`` returns the selection score (validation
    BAC), never a test figure.  A non-finite loss raises ``DivergenceError``.

    ``step(model, x, y, loss_fn)`` computes one batch's loss.  ``checkpoint(epoch, state)``
    runs after every epoch; ``state()`` builds everything needed to go on from there (weights,
    optimizer, best so far, history, the states of ``generators`` and of torch's global
    generator), and ``resume=state`` continues a fit from such a state with the same result,
    to the bit on the CPU, as an uninterrupted one."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum,
                                weight_decay=schedule.weight_decay)
    device_type = next(model.parameters()).device.type
    generators = {"batches": batches.generator, **(generators or {})}
    best_state, result, first_epoch = None, FitResult(best_epoch=-1, best_score=-math.inf), 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        best_state = resume["best_state"]
        result = FitResult(resume["best_epoch"], resume["best_score"], list(resume["history"]))
        for name, state in resume["generators"].items():
            generators[name].set_state(state)
        torch.set_rng_state(resume["torch_rng"])
        first_epoch = resume["epoch"]

    def state(epoch: int) -> dict:
        return {"epoch": epoch, "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()), "best_state": best_state,
                "best_epoch": result.best_epoch, "best_score": result.best_score,
                "history": list(result.history), "torch_rng": torch.get_rng_state(),
                "generators": {name: g.get_state() for name, g in generators.items()}}

    epochs = range(first_epoch, schedule.epochs)
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc=progress, unit="epoch", leave=False, dynamic_ncols=True,
                   initial=first_epoch, total=schedule.epochs)
        epochs = bar
    for epoch in epochs:
        lr = schedule.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if hasattr(loss_fn, "on_epoch"):
            loss_fn.on_epoch(epoch)
        model.train()
        total, seen = torch.zeros((), device=batches.inputs.device), 0
        for x, y in batches:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
                loss = step(model, x, y, loss_fn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(y)
            seen += len(y)
        train_loss = float(total) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise DivergenceError(f"training loss became non-finite ({train_loss}) at epoch {epoch + 1}")
        score = validate()
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_bac": score, "lr": lr}
        result.history.append(record)
        if score > result.best_score:
            result.best_epoch, result.best_score = epoch + 1, score
            best_state = copy.deepcopy(model.state_dict())
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", val_bac=f"{score:.3f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
        if checkpoint is not None and epoch + 1 < schedule.epochs:
            checkpoint(epoch + 1, lambda: state(epoch + 1))
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


@torch.no_grad()
def predict(module: nn.Module, inputs: torch.Tensor, batch_size: int = 1024,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Outputs of ``module`` in eval mode over ``inputs``, batched, concatenated on the CPU."""
    module.eval()
    outs = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        outs.append(module(transform(x) if transform else x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)
