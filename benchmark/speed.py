"""Training-speed benchmark: device-resident batched augmentation against a DataLoader.

``python -m benchmark.speed`` prints, for 32x32 RGB images, the batches per second of the input
pipeline alone (this suite's path: uint8 images on the device, per-image crop offsets and
flips drawn for the whole batch at once; the usual path: a DataLoader with torchvision's
per-image transforms and no workers) and ResNet-32 training images per second through each
path on the same model, with the ratios.  The images are random: only throughput is measured.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmark.models import Classifier, linear_head
from benchmark.models.resnet_cifar import CifarResNet
from benchmark.pipeline import Normalize, pick_device
from benchmark.train import Augment, TensorBatches

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


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


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def resident_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                     device: torch.device) -> TensorBatches:
    normalize = Normalize(torch.tensor(MEAN), torch.tensor(STD), device,
                          channels_last=device.type == "cuda")
    augment = Augment(padding=4, hflip=True)
    return TensorBatches(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
                         torch.from_numpy(labels).to(device), batch_size,
                         torch.Generator().manual_seed(0),
                         transform=lambda x, g: normalize(augment(x, g)))


def loader_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                   device: torch.device):
    loader = torch.utils.data.DataLoader(PerImageDataset(images, labels), batch_size=batch_size,
                                         shuffle=True, num_workers=0, drop_last=True)
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def input_rate(batches, n_batches: int, device: torch.device) -> float:
    """Batches per second of producing model-ready batches, nothing else."""
    iterator = iter(batches)
    for _ in range(3):  # set-up costs and allocator warm-up
        next(iterator)
    sync(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        x, _ = next(iterator)
    sync(device)
    return n_batches / (time.perf_counter() - start)


def training_rate(make_batches, steps: int, batch_size: int, device: torch.device,
                  compile_model: bool) -> float:
    """ResNet-32 training images per second (SGD step, bf16 autocast on CUDA)."""
    torch.manual_seed(0)
    model = Classifier(CifarResNet(32, 3), linear_head(64, 10)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    iterator = iter(make_batches())
    for _ in range(3):  # warm-up (and compilation)
        step(*next(iterator))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(iterator))
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.speed", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--input-batches", type=int, default=25)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    need = args.batch_size * (max(args.input_batches, args.train_steps) + 6)
    images, labels = synthetic(max(args.images, need))
    threads = torch.get_num_threads()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{threads} threads'}), "
          f"32x32 RGB, batch {args.batch_size}, {len(labels)} images")

    resident = input_rate(resident_batches(images, labels, args.batch_size, device),
                          args.input_batches, device)
    loader = input_rate(loader_batches(images, labels, args.batch_size, device),
                        args.input_batches, device)
    print(f"input pipeline: device-resident batched {resident:9.1f} batches/s | "
          f"DataLoader per-image {loader:7.1f} batches/s | ratio {resident / loader:.1f}x")

    train_resident = training_rate(
        lambda: resident_batches(images, labels, args.batch_size, device), args.train_steps,
        args.batch_size, device, args.compile)
    train_loader = training_rate(
        lambda: loader_batches(images, labels, args.batch_size, device), args.train_steps,
        args.batch_size, device, args.compile)
    print(f"ResNet-32 training: device-resident {train_resident:9.1f} images/s | "
          f"DataLoader {train_loader:9.1f} images/s | ratio {train_resident / train_loader:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
