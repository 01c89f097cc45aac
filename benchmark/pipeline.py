"""The stages of one benchmark cell: data, phase 1 (cached), embeddings, phase 3, evaluation."""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmark import tracking
from benchmark.config import RunConfig
from benchmark.data import ImageSet
from benchmark.data.profiles import check_counts, draw_per_class, fingerprint, profile_counts, stratified_split
from benchmark.errors import UserError
from benchmark.losses import Loss
from benchmark.metrics import balanced_accuracy, confusion, generalization_gap, scores_from_confusion
from benchmark.models import Classifier
from benchmark.registry import BACKBONES, DATASETS, LOSSES, METHODS
from benchmark.train import Augment, TensorBatches, fit, predict

SPLITS = ("train", "val", "test")


@dataclass
class CellData:
    """The images of one cell: long-tailed training subset, validation split, balanced test."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    train_indices: np.ndarray  # into the training pool: what phase 1 trains on
    profile_counts: list[int]
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.train.labels, minlength=self.train.num_classes).tolist()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=2)
def load_dataset(name: str, root: str | None, download: bool) -> tuple[ImageSet, ImageSet]:
    """A registered dataset's (training pool, test set), loaded once per process."""
    return DATASETS.create(name, root=root, download=download).load()


def prepare_data(cfg: RunConfig) -> CellData:
    pool, test = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    pool = ImageSet(resize(pool.images, cfg.image_size), pool.labels, pool.classes)
    test = ImageSet(resize(test.images, cfg.image_size), test.labels, test.classes)
    labels = pool.labels.numpy()
    available = np.bincount(labels, minlength=pool.num_classes)
    counts = profile_counts(cfg.profile, available.tolist(), cfg.ratio)
    check_counts(counts, pool.classes)
    subset = draw_per_class(labels, counts, seed=cfg.subset_seed)
    keep, held = stratified_split(labels[subset], cfg.val_fraction, seed=cfg.subset_seed)
    train = pool.subset(torch.from_numpy(subset[keep]))
    pixels = train.images.float().div_(255).transpose(0, 1).flatten(1)
    return CellData(train=train, val=pool.subset(torch.from_numpy(subset[held])), test=test,
                    train_indices=subset[keep], profile_counts=counts,
                    mean=pixels.mean(1), std=pixels.std(1).clamp_min(1e-3))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but PyTorch sees no CUDA device")
    return torch.device(name)


class Normalize:
    """uint8 images -> float, per-channel normalised (on whatever device they are)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                 channels_last: bool = False):
        self.mean = mean.to(device)[None, :, None, None]
        self.std = std.to(device)[None, :, None, None]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format)


@dataclass
class Phase1:
    """What phase 1 leaves for the rest of the cell, trained here or loaded from the cache."""

    embeddings: dict[str, np.ndarray]  # {split}_x, {split}_y
    state_dict: dict[str, torch.Tensor]  # extractor.* and head.*
    summary: dict  # best epoch, validation BAC, timings, embedding size
    run_id: str


def build_model(cfg: RunConfig, data: CellData, loss: Loss, device: torch.device) -> Classifier:
    """The phase-1 model, seeded; built before the run starts so a bad backbone name or
    parameter leaves no run behind."""
    torch.manual_seed(cfg.seed)
    extractor = BACKBONES.create(cfg.backbone, in_channels=data.train.images.shape[1],
                                 image_size=cfg.image_size, **cfg.backbone_params)
    model = Classifier(extractor, loss.make_head(extractor.embedding_dim, data.train.num_classes))
    channels_last = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return model.to(device, memory_format=channels_last)


def train_phase1(cfg: RunConfig, data: CellData, model: Classifier, loss: Loss,
                 device: torch.device, run: tracking.TrackedRun, progress: bool) -> Phase1:
    generator = torch.Generator().manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    extractor = model.extractor
    normalize = Normalize(data.mean, data.std, device, channels_last=cuda)
    defaults = DATASETS.get(cfg.dataset).defaults
    augment = Augment(padding=defaults.crop_padding, hflip=defaults.hflip)
    batches = TensorBatches(data.train.images.to(device), data.train.labels.to(device),
                            cfg.batch_size, generator,
                            transform=lambda x, g: normalize(augment(x, g)))
    val_images, val_labels = data.val.images.to(device), data.val.labels.numpy()

    def validate() -> float:
        predicted = predict(model, val_images, transform=normalize).argmax(1).numpy()
        return balanced_accuracy(val_labels, predicted, data.val.num_classes)

    def log_epoch(epoch: int, record: dict) -> None:
        run.log_metrics({"phase1_train_loss": record["train_loss"],
                         "phase1_val_bac": record["val_bac"], "phase1_lr": record["lr"]}, step=epoch)

    start = time.perf_counter()
    trained = torch.compile(model) if cfg.compile else model  # shares model's parameters
    result = fit(trained, batches, loss, cfg.schedule, validate, on_epoch=log_epoch,
                 progress="phase 1" if progress else None, amp=cuda)
    time_phase1 = time.perf_counter() - start

    start = time.perf_counter()
    embeddings = {}
    for split in SPLITS:
        images = getattr(data, split)
        embeddings[f"{split}_x"] = predict(model.extractor, images.images.to(device),
                                           transform=normalize).numpy()
        embeddings[f"{split}_y"] = images.labels.numpy()
    time_phase2 = time.perf_counter() - start

    summary = {"best_epoch": result.best_epoch, "best_val_bac": result.best_score,
               "time_phase1_s": time_phase1, "time_phase2_s": time_phase2,
               "embedding_dim": extractor.embedding_dim}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp, "model.pt"))
        np.savez_compressed(Path(tmp, "embeddings.npz"), **embeddings)
        Path(tmp, "summary.json").write_text(json.dumps(summary, indent=1))
        run.log_artifacts(tmp, "phase1")
    run.log_metrics({"phase1_best_epoch": result.best_epoch,
                     "phase1_best_val_bac": result.best_score})
    run.set_tags({tracking.TAG_PHASE1_COMPLETE: "true", tracking.TAG_PHASE1_RUN: run.run_id})
    phase1 = Phase1(embeddings, state, summary, run.run_id)
    remember_phase1(phase1)
    return phase1


# Phase-1 results this process already holds, by the run that trained them: a grid or a study
# runs many cells on one phase 1 and should not download it again for each.
_PHASE1_MEMO: OrderedDict[str, Phase1] = OrderedDict()
PHASE1_MEMO_SIZE = 4


def remember_phase1(phase1: Phase1) -> None:
    _PHASE1_MEMO[phase1.run_id] = phase1
    _PHASE1_MEMO.move_to_end(phase1.run_id)
    while len(_PHASE1_MEMO) > PHASE1_MEMO_SIZE:
        _PHASE1_MEMO.popitem(last=False)


def load_phase1(run_id: str, run: tracking.TrackedRun) -> Phase1:
    """The phase-1 artifacts of ``run_id`` (from memory when this process has them)."""
    run.set_tags({tracking.TAG_PHASE1_RUN: run_id})
    if run_id in _PHASE1_MEMO:
        _PHASE1_MEMO.move_to_end(run_id)
        return _PHASE1_MEMO[run_id]
    folder = tracking.download_artifacts(run_id, "phase1")
    with np.load(folder / "embeddings.npz") as npz:
        embeddings = {k: npz[k] for k in npz.files}
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    summary = json.loads((folder / "summary.json").read_text())
    shutil.rmtree(folder.parent, ignore_errors=True)
    phase1 = Phase1(embeddings, state, summary, run_id)
    remember_phase1(phase1)
    return phase1


def retrain_head(cfg: RunConfig, phase1: Phase1, loss: Loss, resampler, num_classes: int,
                 device: torch.device, run: tracking.TrackedRun, progress: bool,
                 on_epoch: Callable[[int, float], None] | None = None):
    """Phase 3: resample the training embeddings, retrain the head from its phase-1 weights
    (selected on validation BAC).  Returns the head, the embeddings it was trained on and
    the timings."""
    emb = phase1.embeddings
    head = loss.make_head(phase1.summary["embedding_dim"], num_classes)
    head.load_state_dict({k[len("head."):]: v for k, v in phase1.state_dict.items()
                          if k.startswith("head.")})
    head = head.to(device)
    if resampler is None:
        return head, emb["train_x"], emb["train_y"], {}
    start = time.perf_counter()
    train_x, train_y = resampler.fit_resample(emb["train_x"], emb["train_y"])
    time_resample = time.perf_counter() - start

    batches = TensorBatches(torch.as_tensor(train_x, dtype=torch.float32, device=device),
                            torch.as_tensor(train_y, dtype=torch.int64, device=device),
                            cfg.head_schedule.batch_size, torch.Generator().manual_seed(cfg.seed))
    val_x = torch.as_tensor(emb["val_x"], dtype=torch.float32, device=device)

    def validate() -> float:
        return balanced_accuracy(emb["val_y"], predict(head, val_x).argmax(1).numpy(), num_classes)

    def log_epoch(epoch: int, record: dict) -> None:
        run.log_metrics({"phase3_train_loss": record["train_loss"],
                         "phase3_val_bac": record["val_bac"]}, step=epoch)
        if on_epoch is not None:
            on_epoch(epoch, record["val_bac"])

    start = time.perf_counter()
    result = fit(head, batches, loss.head_loss(), cfg.head_schedule, validate, on_epoch=log_epoch,
                 progress="phase 3" if progress else None)
    timings = {"time_resample_s": time_resample, "time_phase3_s": time.perf_counter() - start,
               "best_val_bac": result.best_score}
    run.log_metrics({"phase3_best_epoch": result.best_epoch,
                     "phase3_best_val_bac": result.best_score})
    return head, train_x, train_y, timings


def evaluate(head, phase1: Phase1, train_x: np.ndarray, train_y: np.ndarray, classes: list[str],
             device: torch.device) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Test metrics of the final model and the generalization gap of the embeddings its head
    was trained on; also the confusion matrix and the per-class gap."""
    emb, num_classes = phase1.embeddings, len(classes)
    test_x = torch.as_tensor(emb["test_x"], dtype=torch.float32, device=device)
    predicted = predict(head, test_x).argmax(1).numpy()
    cm = confusion(emb["test_y"], predicted, num_classes)
    scores = scores_from_confusion(cm)
    gap, gap_per_class = generalization_gap(train_x, train_y, emb["test_x"], emb["test_y"],
                                            num_classes)
    metrics = {f"test_{k}": v for k, v in scores.items() if k != "recall"}
    metrics.update({f"test_recall_class_{c}": r for c, r in enumerate(scores["recall"])})
    metrics["gap"] = gap
    metrics.update({f"gap_class_{c}": g for c, g in enumerate(gap_per_class) if np.isfinite(g)})
    return metrics, cm, gap_per_class


def log_outputs(run: tracking.TrackedRun, phase1: Phase1, head, cm: np.ndarray,
                gap_per_class: np.ndarray, data: CellData, train_y: np.ndarray,
                train_x: np.ndarray, metrics: dict) -> None:
    """Artifacts of the finished cell: reassembled checkpoint, resampled embeddings,
    per-class table and confusion-matrix plot."""
    import pandas as pd

    state = {k: v for k, v in phase1.state_dict.items() if not k.startswith("head.")}
    state.update({f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    classes = data.train.classes
    real = np.asarray(data.class_counts)
    final = np.bincount(train_y, minlength=len(classes))
    table = pd.DataFrame({
        "class": classes, "train_real": real, "train_synthetic": final - real,
        "test_recall": [metrics[f"test_recall_class_{c}"] for c in range(len(classes))],
        "test_support": cm.sum(axis=1), "gap": gap_per_class})
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp, "model.pt"))
        table.to_csv(Path(tmp, "per_class.csv"), index=False)
        if len(train_x) > len(phase1.embeddings["train_x"]):
            np.savez_compressed(Path(tmp, "resampled_train.npz"), x=train_x, y=train_y)
        plot_confusion(cm, classes, Path(tmp, "confusion_matrix.png"))
        run.log_artifacts(tmp, "results")


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(12.0, max(4.0, 0.45 * len(classes)))  # 100 classes stay a readable heat map
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 20:
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90)
        ax.set_yticks(ticks, classes)
        for i in ticks:
            for j in ticks:
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix (row-normalised colour, counts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cell(cfg: RunConfig, *, reuse_phase1: bool = True, progress: bool = True,
             tags: dict[str, str] | None = None, evaluate_test: bool = True,
             on_head_epoch: Callable[[int, float], None] | None = None,
             run_name: str | None = None) -> dict:
    """Run one cell end to end and log it; returns its metrics, run id and provenance.

    Everything a user can get wrong (names, numbers, missing data, an empty class) is checked
    before the MLflow run starts, so a mistake leaves no run behind.  ``evaluate_test=False``
    (tuning trials) stops at the validation score and never touches the test set;
    ``on_head_epoch(epoch, val_bac)`` sees every phase-3 epoch and may raise to stop the run
    (a pruned trial), which then ends KILLED.
    """
    started = time.perf_counter()
    cfg = cfg.resolved()
    method = METHODS.create(cfg.method, **cfg.method_params)
    data = prepare_data(cfg)
    device = pick_device(cfg.device)
    loss = LOSSES.create(cfg.loss, class_counts=data.class_counts, schedule=cfg.schedule,
                         **cfg.loss_params)
    resampler = method.embedding_resampler(random_state=cfg.seed)
    key = cfg.phase1_key()
    source_run = tracking.find_phase1_run(key) if reuse_phase1 else None
    model = build_model(cfg, data, loss, device) if source_run is None else None

    run_name = run_name or f"{cfg.method}-{cfg.loss}-{cfg.dataset}-s{cfg.seed}"
    with tracking.TrackedRun(cfg.experiment, run_name, {
            tracking.TAG_PHASE1_KEY: key, "method": cfg.method, "loss": cfg.loss,
            "dataset": cfg.dataset, "backbone": cfg.backbone, **(tags or {})}) as run:
        digest = run.log_training_subset(
            data.train_indices, data.train.labels.numpy(),
            name=f"{cfg.dataset}-{cfg.profile}{cfg.ratio:g}-subset{cfg.subset_seed}",
            source={"dataset": cfg.dataset, "profile": cfg.profile, "ratio": str(cfg.ratio),
                    "subset_seed": str(cfg.subset_seed), "val_fraction": str(cfg.val_fraction)})
        run.log_params({**cfg.as_params(),
                        **{f"loss_hparam.{k}": v for k, v in loss.params.items()},
                        "device_used": device.type, "num_classes": data.train.num_classes,
                        "n_train": len(data.train), "n_val": len(data.val),
                        "n_test": len(data.test), "profile_counts": data.profile_counts,
                        "train_class_counts": data.class_counts,
                        "subset_fingerprint": fingerprint(data.train_indices),
                        "subset_digest": digest, "phase1_key": key,
                        **{f"dataset.{k}": v for k, v in DATASETS.create(
                            cfg.dataset, root=cfg.data_root).params.items()}})
        start = time.perf_counter()
        if source_run is None:
            phase1 = train_phase1(cfg, data, model, loss, device, run, progress)
        else:
            phase1 = load_phase1(source_run, run)
        time_load = 0.0 if source_run is None else time.perf_counter() - start
        head, train_x, train_y, timings = retrain_head(
            cfg, phase1, loss, resampler, data.train.num_classes, device, run, progress,
            on_head_epoch)
        metrics = {"val_bac": timings.pop("best_val_bac", phase1.summary["best_val_bac"]),
                   "time_phase1_s": phase1.summary["time_phase1_s"],
                   "time_phase2_s": phase1.summary["time_phase2_s"],
                   "time_resample_s": timings.get("time_resample_s", 0.0),
                   "time_phase3_s": timings.get("time_phase3_s", 0.0),
                   "time_phase1_load_s": time_load}
        if evaluate_test:
            test_metrics, cm, gap_per_class = evaluate(head, phase1, train_x, train_y,
                                                       data.train.classes, device)
            metrics.update(test_metrics)
            log_outputs(run, phase1, head, cm, gap_per_class, data, train_y, train_x,
                        test_metrics)
        metrics["time_wall_s"] = time.perf_counter() - started
        run.log_metrics(metrics)
    return {"run_id": run.run_id, "phase1_run_id": phase1.run_id,
            "phase1_reused": source_run is not None, "metrics": metrics,
            "experiment": run.experiment, "config": cfg}
