"""Training-speed benchmark: the suite's phase-1 loop against the bare training step's ceiling.

``python -m benchmark.speed --device cuda`` trains ResNet-32 (batch 128; on CUDA in bf16
autocast, channels-last) on the ``fake`` dataset's CIFAR-shaped noise images and prints images
per second of:

- the suite's phase-1 loop: ``fit`` on a CIFAR-10-LT-sized subset drawn as a cell draws it
  (exponential profile, ratio 100, balanced validation of the suite's default size), with the
  suite's batching (uint8 images on the device, batched crop and flip, normalisation),
  validation and selection every epoch; through ``fit``'s CUDA-graph path and eagerly.  The
  first epoch (warm-up and capture) is left out of the rate and printed on its own;
- the bare step, the batch already on the device: eager, and the whole step (forward,
  backward, fused SGD) captured once in a CUDA graph and replayed, the ceiling;
- the ratio of the suite's graphed loop to that ceiling (the issue's target: 0.75 on an H100).

``--check`` trains a small learnable problem through ``fit`` with and without the graph path
and compares their losses (and that deferred re-weighting captures the graph again).  On the
CPU the graph rows are skipped.  ``--input`` adds the older comparison of the input path alone
against a torchvision DataLoader with per-image transforms.  ``--json PATH`` writes the
figures.  Imports torch, NumPy and the suite only (no MLflow, Optuna or imbalanced-learn).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmark import train
from benchmark.config import RunConfig
from benchmark.data import ImageSet
from benchmark.data.fake import Fake
from benchmark.data.profiles import balanced_validation, draw_per_class, profile_counts
from benchmark.losses import CrossEntropy
from benchmark.metrics import balanced_accuracy
from benchmark.models import Classifier, linear_head
from benchmark.models.resnet_cifar import CifarResNet
from benchmark.pipeline import Normalize, pick_device
from benchmark.train import Augment, Schedule, TensorBatches, fit, predict

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
RATIO = 100  # CIFAR-10-LT's


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resnet32(device: torch.device, classes: int = 10) -> Classifier:
    torch.manual_seed(0)
    model = Classifier(CifarResNet(32, 3), linear_head(64, classes)).to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def long_tailed_cell(scale: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(training subset, validation set) of the fake dataset as a cell draws them:
    CIFAR-10-LT's profile (ratio 100) times ``scale``, balanced validation."""
    per_class = max(2, math.ceil(5000 * scale))
    val_per_class = next(f.default for f in dataclasses.fields(RunConfig)
                         if f.name == "val_per_class")
    pool, _ = Fake(train_per_class=per_class, test_per_class=1).load()
    labels = pool.labels.numpy()
    counts = [max(1, n) for n in profile_counts("exp", [per_class] * 10, RATIO)]
    subset = draw_per_class(labels, counts, seed=seed)
    train_idx, val_idx = balanced_validation(labels, subset, val_per_class, seed=seed)
    return pool.subset(torch.from_numpy(train_idx)), pool.subset(torch.from_numpy(val_idx))


@contextlib.contextmanager
def counting_captures():
    """``fit``'s graph captures that succeed in the block, counted in the dict it yields."""
    counted = {"captures": 0}
    capture = train.capture_graph

    def counting_capture(run, where):
        replay = capture(run, where)
        counted["captures"] += 1
        return replay

    train.capture_graph = counting_capture
    try:
        yield counted
    finally:
        train.capture_graph = capture


def suite_loop(cell: tuple[ImageSet, ImageSet], device: torch.device, graph: bool,
               epochs: int, batch_size: int) -> dict:
    """Phase 1 as ``pipeline.train_phase1`` runs it (without the tracking): images per
    second over every epoch after the first, the first epoch's seconds, the losses."""
    training, validation = cell
    cuda = device.type == "cuda"
    normalize = Normalize(torch.tensor(MEAN), torch.tensor(STD), device, channels_last=cuda)
    augment = Augment(padding=4, hflip=True)
    batches = TensorBatches(training.images.to(device), training.labels.to(device), batch_size,
                            torch.Generator().manual_seed(0),
                            transform=lambda x, g: normalize(augment(x, g)))
    val_images, val_labels = validation.images.to(device), validation.labels.numpy()
    model = resnet32(device)
    loss = CrossEntropy(torch.bincount(training.labels, minlength=10).tolist())

    def validate() -> float:
        predicted = predict(model, val_images, transform=normalize).argmax(1).numpy()
        return balanced_accuracy(val_labels, predicted, 10)

    stamps = []
    sync(device)
    start = time.perf_counter()
    with counting_captures() as counted:
        result = fit(model, batches, loss, Schedule(epochs=epochs, batch_size=batch_size),
                     validate, on_epoch=lambda epoch, record: stamps.append(time.perf_counter()),
                     amp=cuda, graph=graph)
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else math.nan
    return {"images_per_s": len(training) / steady, "first_epoch_s": stamps[0] - start,
            "epoch_s": steady, "images": len(training), "captures": counted["captures"],
            "train_loss": [r["train_loss"] for r in result.history]}


def bare_step_rate(device: torch.device, batch_size: int, steps: int, graphed: bool) -> float:
    """ResNet-32 training images per second with one random batch already on the device:
    eager (SGD as ``fit`` builds it), or the whole step captured in a CUDA graph."""
    cuda = device.type == "cuda"
    model = resnet32(device)
    loss_fn = CrossEntropy([1] * 10)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, device=device, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last) if cuda else x
    y = torch.randint(0, 10, (batch_size,), device=device, generator=generator)
    if graphed:
        lr = torch.tensor(0.1, device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                    weight_decay=2e-4, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)

    def step(cache: bool = True) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda,
                            cache_enabled=cache):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    model.train()
    if graphed:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(cache=False)
        run = graph.replay
    else:
        run = step
    for _ in range(3):
        run()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def learnable_problem(device: torch.device, n: int = 2000, seed: int = 0):
    """Images whose class shows through crops and flips: a colour per class plus noise
    (uint8, on ``device``)."""
    generator = torch.Generator().manual_seed(seed)
    colours = 40 + 160 * torch.rand(10, 3, 1, 1, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = colours[labels] + 50 * (torch.rand(n, 3, 32, 32, generator=generator) - 0.5)
    return images.round().to(torch.uint8).to(device), labels.to(device)


def graph_check(device: torch.device, epochs: int = 4, batch_size: int = 128) -> dict:
    """``fit`` with and without the graph path on a learnable problem from the same seed:
    the eager loss falls below half of chance's, the graphed one stays finite and close to
    it; deferred re-weighting captures the graph once more."""
    images, labels = learnable_problem(device)
    cuda = device.type == "cuda"
    normalize = Normalize(torch.tensor(MEAN), torch.tensor(STD), device, channels_last=cuda)
    augment = Augment(padding=4, hflip=True)
    histories = {}
    for name, graph, weighting in (("graph", True, "none"), ("eager", False, "none"),
                                   ("graph-drw", True, "drw")):
        if graph and not cuda:
            continue
        batches = TensorBatches(images, labels, batch_size, torch.Generator().manual_seed(1),
                                transform=lambda x, g: normalize(augment(x, g)))
        model = resnet32(device)
        schedule = Schedule(epochs=epochs, lr=0.02, batch_size=batch_size)
        loss = CrossEntropy(torch.bincount(labels.cpu(), minlength=10).tolist(), schedule,
                            weighting=weighting)
        with counting_captures() as counted:
            result = fit(model, batches, loss, schedule, lambda: 0.0, amp=cuda, graph=graph)
        histories[name] = {"train_loss": [r["train_loss"] for r in result.history],
                           "captures": counted["captures"]}
    eager = histories["eager"]["train_loss"]
    report = {"histories": histories, "ok": True, "problems": []}
    if eager[-1] > 0.5 * math.log(10):
        report["problems"].append(f"eager training did not learn ({eager})")
    if "graph" in histories:
        graphed = histories["graph"]["train_loss"]
        gap = max(abs(a - b) for a, b in zip(graphed, eager))
        report["max_loss_gap"] = gap
        if not all(map(math.isfinite, graphed)):
            report["problems"].append(f"graph path loss not finite ({graphed})")
        if any(abs(a - b) > 0.1 + 0.1 * b for a, b in zip(graphed, eager)):
            report["problems"].append(f"graph and eager losses differ ({graphed} vs {eager})")
        if histories["graph"]["captures"] != 1:
            report["problems"].append(f"{histories['graph']['captures']} captures, not 1")
        if histories["graph-drw"]["captures"] != 2:
            report["problems"].append(f"deferred re-weighting: "
                                      f"{histories['graph-drw']['captures']} captures, not 2")
    report["ok"] = not report["problems"]
    return report


# The input path against a DataLoader (--input) ----------------------------------------------
class PerImageDataset(torch.utils.data.Dataset):
    """The torchvision CIFAR recipe: HWC uint8 arrays -> PIL -> per-image transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def input_comparison(device: torch.device, batch_size: int, n_batches: int = 25) -> tuple:
    """Batches per second of producing model-ready batches: the suite's device-resident path
    against a DataLoader with per-image transforms and no workers."""
    rng = np.random.default_rng(0)
    n = batch_size * (n_batches + 4)
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)
    normalize = Normalize(torch.tensor(MEAN), torch.tensor(STD), device,
                          channels_last=device.type == "cuda")
    augment = Augment(padding=4, hflip=True)
    resident = TensorBatches(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
                             torch.from_numpy(labels).to(device), batch_size,
                             torch.Generator().manual_seed(0),
                             transform=lambda x, g: normalize(augment(x, g)))
    loader = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))
              for x, y in torch.utils.data.DataLoader(
                  PerImageDataset(images, labels), batch_size=batch_size, shuffle=True,
                  num_workers=0, drop_last=True))
    rates = []
    for batches in (resident, loader):
        iterator = iter(batches)
        for _ in range(3):  # set-up costs and allocator warm-up
            next(iterator)
        sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            next(iterator)
        sync(device)
        rates.append(n_batches / (time.perf_counter() - start))
    return tuple(rates)


def _sharing_worker(scale: float, epochs: int, batch_size: int, device_name: str, barrier,
                    results) -> None:
    """One of several trainings sharing a device (a process of its own, as a grid's task)."""
    device = torch.device(device_name)
    cell = long_tailed_cell(scale)
    barrier.wait()  # every training starts together
    rate = suite_loop(cell, device, device.type == "cuda", epochs, batch_size)
    results.put(rate["images_per_s"])


def sharing_rates(counts: list[int], scale: float, epochs: int, batch_size: int,
                  device: torch.device) -> dict[int, dict]:
    """For each n in ``counts``: n processes each running the suite's phase-1 loop on the same
    device at once (what ``grid --jobs n`` packs onto one GPU); their images/s each and in
    all (the sum of their steady rates, measured while all of them run)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out = {}
    for n in counts:
        barrier, results = context.Barrier(n), context.Queue()
        processes = [context.Process(target=_sharing_worker, args=(
            scale, epochs, batch_size, str(device), barrier, results)) for _ in range(n)]
        for process in processes:
            process.start()
        rates = [results.get(timeout=600) for _ in processes]
        for process in processes:
            process.join()
        out[n] = {"each": rates, "total": sum(rates)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6,
                        help="epochs of the suite's loop (the first is not timed)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="share of the CIFAR-10-LT-sized subset (1.0: 12,386 images)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of the bare loops")
    parser.add_argument("--no-eager-loop", action="store_true",
                        help="skip the suite's loop without the graph path")
    parser.add_argument("--check", action="store_true", help="compare graph and eager fits")
    parser.add_argument("--input", action="store_true", help="add the input-path comparison")
    parser.add_argument("--share", type=int, nargs="+", metavar="N",
                        help="also run N trainings at once on the device, for each N given "
                             "(how throughput grows when grid --jobs packs cells onto one GPU)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    figures: dict = {"device": str(device), "where": where, "batch_size": args.batch_size}
    print(f"device {device} ({where}); ResNet-32, batch {args.batch_size}"
          f"{', bf16 autocast, channels-last' if cuda else ', float32'}")

    start = time.perf_counter()
    cell = long_tailed_cell(args.scale)
    print(f"fake dataset, CIFAR-10-LT-sized cell: {len(cell[0]):,} training and "
          f"{len(cell[1]):,} validation images ({time.perf_counter() - start:.1f} s to make)")

    loops = [("graph", True)] if cuda else []
    loops += [] if args.no_eager_loop else [("eager", False)]
    for name, graph in loops:
        figures[f"suite_{name}"] = rate = suite_loop(cell, device, graph, args.epochs,
                                                     args.batch_size)
        print(f"suite phase-1 loop, {name:5}: {rate['images_per_s']:9,.0f} images/s "
              f"({rate['epoch_s']:.3f} s/epoch after a first epoch of "
              f"{rate['first_epoch_s']:.2f} s; {rate['captures']} graph capture(s); losses "
              f"{', '.join(f'{v:.3f}' for v in rate['train_loss'])})")
        if graph and rate["captures"] == 0:
            print("WARNING: the graph path captured nothing: this rate is eager")
    figures["bare_eager"] = bare_step_rate(device, args.batch_size, args.steps, graphed=False)
    print(f"bare step, eager:        {figures['bare_eager']:9,.0f} images/s")
    if cuda:
        figures["bare_graph"] = bare_step_rate(device, args.batch_size, args.steps, graphed=True)
        print(f"bare step, CUDA graph:   {figures['bare_graph']:9,.0f} images/s (the ceiling)")
        suite = figures["suite_graph"]["images_per_s"]
        figures["ratio_suite_to_ceiling"] = suite / figures["bare_graph"]
        print(f"suite loop / ceiling: {figures['ratio_suite_to_ceiling']:.2f} "
              f"(target >= 0.75); suite loop / bare eager: {suite / figures['bare_eager']:.2f}"
              f"; 200 epochs of this cell: {200 * figures['suite_graph']['epoch_s']:.0f} s")
    else:
        print("CUDA graph rows skipped: no CUDA device")

    if args.share:
        figures["share"] = shared = sharing_rates(args.share, args.scale, args.epochs,
                                                  args.batch_size, device)
        single = shared[min(shared)]["total"] / min(shared)
        for n, rate in shared.items():
            print(f"{n} trainings sharing the device: {rate['total']:9,.0f} images/s in all "
                  f"({rate['total'] / single:.2f}x one training's; each "
                  f"{min(rate['each']):,.0f} to {max(rate['each']):,.0f})")

    status = 0
    if args.check:
        figures["check"] = check = graph_check(device)
        for name, history in check["histories"].items():
            print(f"check {name:9}: losses "
                  f"{', '.join(f'{v:.3f}' for v in history['train_loss'])}; "
                  f"{history['captures']} capture(s)")
        print(f"check: {'ok' if check['ok'] else 'FAILED: ' + '; '.join(check['problems'])}")
        status = 0 if check["ok"] else 1
    if args.input:
        resident, loader = input_comparison(device, args.batch_size)
        figures["input"] = {"resident_batches_per_s": resident, "loader_batches_per_s": loader}
        print(f"input pipeline: device-resident batched {resident:9.1f} batches/s | "
              f"DataLoader per-image {loader:7.1f} batches/s | ratio {resident / loader:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
