"""The one training loop (phase 1, phase 3 and every other fit), its schedule and batching."""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from benchmark.errors import DivergenceError

# Devices on which ``fit`` may capture its training step in a graph.
GRAPH_DEVICE_TYPES = ("cuda",)
# Eager full-batch steps before the first capture (PyTorch's CUDA-graph notes: warm up first).
GRAPH_WARMUP_STEPS = 3


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
        # Offsets and flips are drawn where the generator lives: a CPU generator gives the
        # same draws on every device; a CUDA one spares each batch a copy from the host.
        where = generator.device
        dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator, device=where).to(device)
        dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator, device=where).to(device)
        cols = torch.arange(w, device=device).expand(n, 1, w)
        if self.hflip:
            flip = (torch.rand(n, generator=generator, device=where) < 0.5).to(device)
            cols = torch.where(flip[:, None, None], w - 1 - cols, cols)
        # One gather does crop and flip: each output pixel reads its source in the padded image.
        rows = dy + torch.arange(h, device=device)[None, :, None]
        source = (rows * (w + 2 * p) + dx + cols).view(n, 1, h * w).expand(n, c, h * w)
        padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
        return padded.reshape(n, c, -1).gather(2, source).view(n, c, h, w)


@dataclass
class TensorBatches:
    """Shuffled mini-batches over tensors that already live on the training device.

    ``transform(x, generator)`` turns a raw batch into model input (augmentation, then
    normalisation); nothing is done per image in Python.  The shuffle and the transform draw
    from ``draws``: the CPU ``generator`` where the inputs live on the CPU (or any non-CUDA
    device), and on CUDA ``device_generator``, a CUDA generator seeded with ``generator``'s
    seed unless given, so no batch waits for numbers from the host (the same draws for a
    seed on the same device; other draws than the CPU's).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    generator: torch.Generator
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    device_generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.device_generator is None and self.inputs.device.type == "cuda":
            self.device_generator = torch.Generator(device=self.inputs.device)
            self.device_generator.manual_seed(self.generator.initial_seed())

    @property
    def draws(self) -> torch.Generator:
        return self.generator if self.device_generator is None else self.device_generator

    def __iter__(self):
        draws = self.draws
        order = torch.randperm(len(self.targets), generator=draws,
                               device=draws.device).to(self.inputs.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.inputs[idx]
            if self.transform is not None:
                x = self.transform(x, draws)
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
    graph: bool | str = "auto",
) -> FitResult:
    """Train ``model`` for ``schedule.epochs`` and leave it holding its best-on-validation
    weights (earliest epoch on ties).  ``validate`` returns the selection score (validation
    BAC), never a test figure.  A non-finite loss raises ``DivergenceError``.

    ``step(model, x, y, loss_fn)`` computes one batch's loss.  ``checkpoint(epoch, state)``
    runs after every epoch; ``state()`` builds everything needed to go on from there (weights,
    optimizer, best so far, history, the states of ``generators`` and of torch's global
    generator), and ``resume=state`` continues a fit from such a state with the same result,
    to the bit on the CPU, as an uninterrupted one.

    ``graph``: on CUDA, ``True`` runs the steps through ``GraphedSteps`` (the whole step
    captured once in a CUDA graph, fused SGD); ``"auto"`` does so where it is safe: the model
    on CUDA, not ``torch.compile``d, and the plain step (or a step with ``graph_safe = True``:
    one that draws no numbers on the host and reads no Python state that changes between
    steps).  ``False``, and every other device, runs today's eager steps.  Same schedule,
    weight decay and selection either way."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    device_type = device.type
    graphed = use_graph(graph, model, step, device_type)
    if graphed:
        # The learning rate lives on the device, so a replayed step reads the schedule's value.
        lr_now = torch.tensor(schedule.lr, dtype=torch.float32, device=device)
        optimizer = torch.optim.SGD(params, lr=lr_now, momentum=schedule.momentum,
                                    weight_decay=schedule.weight_decay, fused=True)
    else:
        optimizer = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum,
                                    weight_decay=schedule.weight_decay)
    generators = {"batches": batches.generator, **(generators or {})}
    if batches.device_generator is not None:
        generators["batches_device"] = batches.device_generator
    best_state, result, first_epoch = None, FitResult(best_epoch=-1, best_score=-math.inf), 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if graphed:  # a checkpoint brings its own lr and optimizer flags: put the graph's back
            for group in optimizer.param_groups:
                group.update(lr=lr_now, fused=True, foreach=None)
        best_state = resume["best_state"]
        result = FitResult(resume["best_epoch"], resume["best_score"], list(resume["history"]))
        for name, state in resume["generators"].items():
            if name in generators:  # "batches_device" only where the batches are on CUDA
                generators[name].set_state(state)
        torch.set_rng_state(resume["torch_rng"])
        first_epoch = resume["epoch"]

    def state(epoch: int) -> dict:
        return {"epoch": epoch, "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()), "best_state": best_state,
                "best_epoch": result.best_epoch, "best_score": result.best_score,
                "history": list(result.history), "torch_rng": torch.get_rng_state(),
                "generators": {name: g.get_state() for name, g in generators.items()}}

    steps = GraphedSteps(model, loss_fn, step, optimizer, amp) if graphed else None
    epochs = range(first_epoch, schedule.epochs)
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc=progress, unit="epoch", leave=False, dynamic_ncols=True,
                   initial=first_epoch, total=schedule.epochs)
        epochs = bar
    for epoch in epochs:
        lr = schedule.lr_at(epoch)
        if graphed:
            lr_now.fill_(lr)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if hasattr(loss_fn, "on_epoch"):
            loss_fn.on_epoch(epoch)
        model.train()
        if steps is not None:
            total, seen = steps.epoch(batches)
        else:
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


def use_graph(graph: bool | str, model: nn.Module, step: Callable, device_type: str) -> bool:
    """Whether ``fit`` runs its steps through ``GraphedSteps`` (see ``fit``)."""
    if graph not in (True, False, "auto"):
        raise ValueError(f"graph must be True, False or 'auto', not {graph!r}")
    if graph is True and device_type not in GRAPH_DEVICE_TYPES:
        raise ValueError(f"graph=True needs the model on a CUDA device, not {device_type}")
    if graph == "auto":
        return (device_type in GRAPH_DEVICE_TYPES and not hasattr(model, "_orig_mod")
                and (step is plain_step or getattr(step, "graph_safe", False)))
    return bool(graph)


def capture_graph(run: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Capture ``run`` in a CUDA graph (nothing runs yet); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph):
        run()
    return graph.replay


class GraphedSteps:
    """One fit's training steps with the whole step captured in a CUDA graph.

    A full batch is copied into static input buffers and replays the graph: forward under
    bf16 autocast, backward, the fused SGD step (its learning rate a device tensor that
    ``fit`` sets each epoch) and the running loss sum, so a step costs the host a few kernel
    launches and never waits for the device.  The first ``GRAPH_WARMUP_STEPS`` full batches
    run eagerly on a side stream (PyTorch's CUDA-graph notes: warm up before capturing), the
    next one is captured and replayed; a batch of another size (an epoch's last, partial
    batch) runs eagerly, on the graph's own gradient tensors.  Every step is a real step of
    the schedule: warm-up and capture change nothing in the recipe.

    The graph is captured again, after one more eager step, when the Python side of the loss
    or the model has changed at an epoch's start (``state_key``: deferred re-weighting
    switching on, a flag a method flips between epochs).  Within an epoch the step must
    compute the same thing from the same tensors (``fit``'s "auto" takes only steps that do).
    If a capture fails (a step that synchronises with the host), training goes on eagerly
    with a warning.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, step: Callable,
                 optimizer: torch.optim.Optimizer, amp: bool):
        self.model, self.loss_fn, self.step = model, loss_fn, step
        self.optimizer, self.amp = optimizer, amp
        self.device = next(model.parameters()).device
        self.loss_sum = torch.zeros((), device=self.device)
        self.replay: Callable[[], None] | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key = None
        self.warmups = 0
        self.failed = False
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def epoch(self, batches: TensorBatches) -> tuple[torch.Tensor, int]:
        """Train on every batch once; the summed loss (a device tensor) and the image count."""
        self.loss_sum.zero_()
        if self.replay is not None and self.key != self.state_key():
            self.replay = None
            self.warmups = GRAPH_WARMUP_STEPS - 1
        seen = 0
        for x, y in batches:
            if len(y) == batches.batch_size and not self.failed:
                self.full_batch(x, y)
            else:
                self.eager(x, y)
            seen += len(y)
        return self.loss_sum, seen

    def full_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.replay is not None:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.replay()
        elif self.warmups < GRAPH_WARMUP_STEPS:
            self.warmups += 1
            with self.side_stream():
                self.eager(x, y)
        else:
            self.capture(x, y)

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.step(self.model, x, y, self.loss_fn)
        # Once a graph exists its gradient tensors stay in place: zeroed, not dropped.
        self.optimizer.zero_grad(set_to_none=self.replay is None)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(y)

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static = (x.clone(), y.clone())
        self.key = self.state_key()

        def whole_step() -> None:
            # Gradients made during capture come from the graph's memory and stay there; a
            # replay overwrites them (and a plain re-run of this function starts afresh).
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                                cache_enabled=False):
                loss = self.step(self.model, *self.static, self.loss_fn)
            loss.backward()
            self.optimizer.step()
            self.loss_sum += loss.detach() * len(y)

        try:
            self.replay = capture_graph(whole_step, self.device)
        except RuntimeError as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"CUDA graph capture of the training step failed ({message}); "
                          f"training goes on eagerly", RuntimeWarning, stacklevel=2)
            self.failed, self.replay = True, None
            self.eager(x, y)
            return
        self.replay()

    def state_key(self) -> tuple:
        """What a captured graph took from the Python side of the loss and the model: every
        module's plain attributes (a re-weighting switch, a flag a method sets between
        epochs), its hooks (a module inserted or taken out) and where its parameters and
        buffers live."""
        modules = [self.loss_fn, *self.model.modules()]
        plain = tuple(
            tuple(sorted((name, value) for name, value in getattr(module, "__dict__", {}).items()
                         if isinstance(value, (bool, int, float, str, type(None)))))
            for module in modules)
        torch_modules = [module for module in modules if isinstance(module, nn.Module)]
        hooks = tuple(tuple(getattr(module, kind).keys()) for module in torch_modules
                      for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                                   "_backward_pre_hooks"))
        tensors = tuple((name, tensor.data_ptr()) for module in torch_modules
                        for name, tensor in [*module.named_parameters(recurse=False),
                                             *module.named_buffers(recurse=False)])
        return plain, hooks, tensors

    @contextlib.contextmanager
    def side_stream(self):
        if self.stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)


@torch.no_grad()
def predict(module: nn.Module, inputs: torch.Tensor, batch_size: int = 1024,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Outputs of ``module`` in eval mode over ``inputs``, batched, concatenated on the CPU
    (with one copy from the device at the end: the device never waits for the host between
    batches)."""
    module.eval()
    outs = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        outs.append(module(transform(x) if transform else x).float())
    return torch.cat(outs).cpu() if outs else torch.empty(0)
