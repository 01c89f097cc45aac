"""The stages of one benchmark cell: data, training set, phase 1 (cached), phase 2, phase 3, test."""
from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmark import schema, tracking
from benchmark.cell import Cell, CellData
from benchmark.config import SUITE_BACKBONE_ARGS, RunConfig
from benchmark.data import ImageSet
from benchmark.diagnostics import chosen as chosen_diagnostics, run_diagnostics
from benchmark.data.profiles import (balanced_validation, check_counts, choose_validation,
                                     draw_per_class, fingerprint, profile_counts,
                                     stratified_split)
from benchmark.errors import UserError
from benchmark.methods import HeadTraining
from benchmark.metrics import balanced_accuracy, confusion, generalization_gap, scores_from_confusion
from benchmark.models import Classifier, ImageClassifier
from benchmark.registry import BACKBONES, DATASETS, LOSSES
from benchmark.train import Augment, TensorBatches, fit, predict

SPLITS = ("train", "val", "test")
# Phase 1 saves a checkpoint to its run at most this often (seconds; 0: every epoch), so a
# killed cell resumes from there.  Set by the environment for tests and long clusters.
CHECKPOINT_SECONDS = float(os.environ.get("BENCHMARK_CHECKPOINT_SECONDS", "300"))


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
    """The long-tailed training subset, the validation set and the test set of a cell.

    The validation set is ``cfg.validation``: ``balanced`` draws ``val_per_class`` images of
    every class from the pool's images the subset did not use (a class without enough spare
    images, the head class, gives the shortfall from its subset; every other class trains on
    exactly its profile count); ``fraction`` holds out a stratified ``val_fraction`` of the
    subset; ``auto`` takes ``balanced`` where the pool has images to spare (see
    ``choose_validation``).  Both draws use the subset seed: the same for every training seed
    and method of a cell."""
    pool, test = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    if pool.num_classes < 2:
        raise UserError(f"dataset '{cfg.dataset}' has {pool.num_classes} class"
                        f"{'' if pool.num_classes == 1 else 'es'} ({', '.join(pool.classes)}); "
                        f"classification needs at least 2")
    pool = ImageSet(resize(pool.images, cfg.image_size), pool.labels, pool.classes)
    test = ImageSet(resize(test.images, cfg.image_size), test.labels, test.classes)
    labels = pool.labels.numpy()
    available = np.bincount(labels, minlength=pool.num_classes)
    counts = profile_counts(cfg.profile, available.tolist(), cfg.ratio)
    check_counts(counts, pool.classes)
    subset = draw_per_class(labels, counts, seed=cfg.subset_seed)
    mode, note = cfg.validation, ""
    if mode == "auto":
        mode, note = choose_validation(labels, subset, cfg.val_per_class)
    if mode == "balanced":
        train_idx, val_idx = balanced_validation(labels, subset, cfg.val_per_class,
                                                 seed=cfg.subset_seed)
    else:
        keep, held = stratified_split(labels[subset], cfg.val_fraction, seed=cfg.subset_seed)
        train_idx, val_idx = subset[keep], subset[held]
    train = pool.subset(torch.from_numpy(train_idx))
    pixels = train.images.float().div_(255).transpose(0, 1).flatten(1)
    return CellData(train=train, val=pool.subset(torch.from_numpy(val_idx)), test=test,
                    train_indices=train_idx, val_indices=val_idx, profile_counts=counts,
                    mean=pixels.mean(1), std=pixels.std(1).clamp_min(1e-3), validation=mode,
                    validation_note=note)


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
    summary: dict  # best epoch, validation BAC, timings, embedding size, what it was trained on
    run_id: str


def build_model(cell: Cell) -> Classifier:
    """The phase-1 model, seeded, with the method's changes; built before the run starts so a
    bad backbone name or parameter leaves no run behind."""
    cfg, data = cell.cfg, cell.data
    torch.manual_seed(cfg.seed)
    extractor = BACKBONES.create(cfg.backbone, in_channels=data.train.images.shape[1],
                                 image_size=cfg.image_size, **cfg.backbone_params)
    model = Classifier(extractor, cell.loss.make_head(extractor.embedding_dim,
                                                      data.train.num_classes))
    model = cell.method.build_model(cell, model)
    channels_last = torch.channels_last if cell.device.type == "cuda" else torch.preserve_format
    return model.to(cell.device, memory_format=channels_last)


def normalizer(cell: Cell) -> "Normalize":
    return Normalize(cell.data.mean, cell.data.std, cell.device,
                     channels_last=cell.device.type == "cuda")


# Training-set stage ---------------------------------------------------------------------------
@dataclass
class TrainingSet:
    """The images phase 1 trains on: the real subset, then what the method added."""

    images: ImageSet
    synthetic_counts: list[int]
    timings: dict[str, float]  # stage -> seconds: ``training_set`` and the hook's sub-stages
    run_id: str | None  # the run that computed it, when loaded from the cache

    @property
    def reused(self) -> bool:
        return self.run_id is not None


# Training sets this process holds, by (store, key): a grid's seeds reuse them from memory.
_TRAINING_SET_MEMO: OrderedDict[tuple[str, str], TrainingSet] = OrderedDict()


def cached_training_set(cell: Cell, key: str | None, reuse: bool = True) -> TrainingSet | None:
    """The method's training set where nothing needs computing: the real subset for a method
    without the stage, else (``reuse``) the one this process or the store holds for ``key``;
    None when it must be computed (``compute_training_set``, inside the run).  Called before
    the run starts, so that a cached stage that does not match leaves no run behind."""
    real = cell.data.train
    if key is None:
        return TrainingSet(real, [0] * real.num_classes, {}, None)
    memo_key = (tracking.tracking_uri(), key)
    if not reuse:  # --no-cache: the training set is computed again too
        _TRAINING_SET_MEMO.pop(memo_key, None)
        return None
    if memo_key in _TRAINING_SET_MEMO:
        return _TRAINING_SET_MEMO[memo_key]
    source = tracking.find_stage_run("training_set", key)
    if source is None:
        return None
    folder = tracking.download_artifacts(source, "training_set")
    with np.load(folder / "synthetic.npz") as npz:
        images, labels = torch.from_numpy(npz["images"]), torch.from_numpy(npz["labels"])
    summary = json.loads((folder / "summary.json").read_text())
    shutil.rmtree(folder.parent, ignore_errors=True)
    if summary["real_class_counts"] != cell.data.class_counts or \
            list(images.shape[1:]) != list(real.images.shape[1:]):
        raise UserError(f"the cached training set of run {source} does not match this cell "
                        f"(class counts {summary['real_class_counts']} vs "
                        f"{cell.data.class_counts}); rerun with --no-cache")
    combined = ImageSet(torch.cat([real.images, images]), torch.cat([real.labels, labels]),
                        real.classes)
    # Stores written before sub-stage times held only the stage's seconds.
    timings = summary.get("timings") or {"training_set": summary["seconds"]}
    return remember_training_set(memo_key, TrainingSet(combined, summary["synthetic_counts"],
                                                       timings, source))


def compute_training_set(cell: Cell, key: str) -> TrainingSet:
    """Run the method's ``prepare_training_set`` (inside the run: a generator that diverges
    ends it FAILED).  Seconds the hook recorded in ``cell.timings`` for sub-stages of its own
    (a generator's training) are carved out of the stage's: ``training_set`` keeps the rest,
    so that the runtime total counts each second once.  The global random state is left as
    it was, so that phase 1 does not depend on what the hook drew."""
    real = cell.data.train
    before = set(cell.timings)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        combined = cell.method.prepare_training_set(cell, real)
    seconds = time.perf_counter() - start
    parts = {stage: cell.timings.pop(stage) for stage in set(cell.timings) - before}
    timings = {**parts, "training_set": max(0.0, seconds - sum(parts.values()))}
    synthetic = (torch.bincount(combined.labels, minlength=real.num_classes)
                 - torch.bincount(real.labels, minlength=real.num_classes)).tolist()
    return remember_training_set((tracking.tracking_uri(), key),
                                 TrainingSet(combined, synthetic, timings, None))


def remember_training_set(memo_key: tuple[str, str], training_set: TrainingSet) -> TrainingSet:
    _TRAINING_SET_MEMO[memo_key] = training_set
    _TRAINING_SET_MEMO.move_to_end(memo_key)
    while len(_TRAINING_SET_MEMO) > 2:
        _TRAINING_SET_MEMO.popitem(last=False)
    return training_set


def training_set_stage(cell: Cell, key: str | None, reuse: bool = True) -> TrainingSet:
    """The method's training set, from the cache where it may be, else computed."""
    return cached_training_set(cell, key, reuse) or compute_training_set(cell, key)


def log_training_set(cell: Cell, key: str | None, training_set: TrainingSet) -> None:
    """Record the training-set stage in the run: its figures, counts and stage times always
    (a reused stage's are those of the run that computed it, named by the tag
    ``training_set_run_id``); the synthetic images themselves, and the stage's completion,
    when computed here (a run with another training seed then reuses them)."""
    run, real = cell.run, cell.data.train
    if key is None:
        return
    cell.timings.update(training_set.timings)
    run.set_tags({"training_set_key": key})
    run.log_params({"train_synthetic_counts": training_set.synthetic_counts})
    n_real = len(real)
    with tempfile.TemporaryDirectory() as tmp:
        cell.method.training_set_artifacts(cell, real, training_set.images, Path(tmp))
        if not training_set.reused:
            np.savez_compressed(Path(tmp, "synthetic.npz"),
                                images=training_set.images.images[n_real:].numpy(),
                                labels=training_set.images.labels[n_real:].numpy())
            Path(tmp, "summary.json").write_text(json.dumps({
                "real_class_counts": cell.data.class_counts,
                "synthetic_counts": training_set.synthetic_counts,
                "seconds": sum(training_set.timings.values()),
                "timings": training_set.timings}, indent=1))
        run.log_artifacts(tmp, "training_set")
    run.set_tags({"training_set_run_id": training_set.run_id or run.run_id})
    if not training_set.reused:
        run.set_tags({"training_set_complete": "true"})
        training_set.run_id = run.run_id  # later cells of this process reuse it as stored


# Phase 1 --------------------------------------------------------------------------------------
def train_phase1(cell: Cell, model: Classifier, training_set: TrainingSet,
                 resume: dict | None = None) -> Phase1:
    """Train extractor and head end to end on ``training_set``, checkpointing into the run;
    then embed the real training subset, validation and test (phase 2)."""
    training = training_set.images
    cfg, data, device, run = cell.cfg, cell.data, cell.device, cell.run
    generator = cell.generator("batches")
    cuda = device.type == "cuda"
    normalize = normalizer(cell)
    defaults = DATASETS.get(cfg.dataset).defaults
    augment = Augment(padding=defaults.crop_padding, hflip=defaults.hflip)
    batches = TensorBatches(training.images.to(device), training.labels.to(device),
                            cfg.batch_size, generator,
                            transform=lambda x, g: normalize(augment(x, g)))
    val_images, val_labels = data.val.images.to(device), data.val.labels.numpy()

    def validate() -> float:
        predicted = predict(model, val_images, transform=normalize).argmax(1).numpy()
        return balanced_accuracy(val_labels, predicted, data.val.num_classes)

    def log_epoch(epoch: int, record: dict) -> None:
        run.log_metrics({schema.phase(1, "train_loss"): record["train_loss"],
                         schema.phase(1, "val_bac"): record["val_bac"],
                         schema.phase(1, "lr"): record["lr"]}, step=epoch)
        cell.on_epoch_end("phase1", epoch, record)

    last_saved = time.monotonic()

    def checkpoint(epoch: int, state: Callable[[], dict]) -> None:
        nonlocal last_saved
        if time.monotonic() - last_saved < CHECKPOINT_SECONDS:
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({**state(), "elapsed": time.perf_counter() - start + elapsed_before},
                       Path(tmp, "state.pt"))
            run.flush()  # the curves up to the checkpoint belong with it
            run.log_artifact(Path(tmp, "state.pt"), "checkpoint")
        run.set_tags({tracking.TAG_CHECKPOINT_EPOCH: str(epoch)})
        last_saved = time.monotonic()

    elapsed_before = 0.0
    if resume is not None:
        elapsed_before = resume.get("elapsed", 0.0)
        for record in resume["history"]:  # the resumed run's curves start at epoch 1 too
            run.log_metrics({schema.phase(1, "train_loss"): record["train_loss"],
                             schema.phase(1, "val_bac"): record["val_bac"],
                             schema.phase(1, "lr"): record["lr"]}, step=record["epoch"])
    start = time.perf_counter()
    trained = torch.compile(model) if cfg.compile else model  # shares model's parameters
    result = fit(trained, batches, cell.loss, cfg.schedule, validate, on_epoch=log_epoch,
                 progress="phase 1" if cell.progress else None, amp=cuda,
                 step=cell.method.train_step(cell), generators=cell.generators,
                 resume=resume, checkpoint=checkpoint)
    cell.timings["phase1"] = time.perf_counter() - start + elapsed_before

    start = time.perf_counter()
    embeddings = {}
    for split in SPLITS:
        images = getattr(data, split)
        embeddings[f"{split}_x"] = predict(model.extractor, images.images.to(device),
                                           transform=normalize).numpy()
        embeddings[f"{split}_y"] = images.labels.numpy()
    cell.timings["phase2"] = time.perf_counter() - start

    summary = {"best_epoch": result.best_epoch, "best_val_bac": result.best_score,
               "time_phase1_s": cell.timings["phase1"], "time_phase2_s": cell.timings["phase2"],
               "embedding_dim": model.extractor.embedding_dim, **cell_facts(cell),
               "time_training_set_s": training_set.timings.get("training_set", 0.0),
               # A run that reuses this phase 1 is charged for the training set it needs.
               "training_set_timings": training_set.timings,
               "synthetic_images": (
                   torch.bincount(training.labels, minlength=data.train.num_classes)
                   - torch.bincount(data.train.labels, minlength=data.train.num_classes)).tolist()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp, "model.pt"))
        np.savez_compressed(Path(tmp, "embeddings.npz"), **embeddings)
        Path(tmp, "summary.json").write_text(json.dumps(summary, indent=1))
        run.log_artifacts(tmp, "phase1")
    run.log_metrics({schema.phase(1, "best_epoch"): result.best_epoch,
                     schema.phase(1, "best_val_bac"): result.best_score})
    run.set_tags({tracking.TAG_PHASE1_COMPLETE: "true", tracking.TAG_PHASE1_RUN: run.run_id})
    phase1 = Phase1(embeddings, state, summary, run.run_id)
    remember_phase1(phase1)
    return phase1


def cell_facts(cell: Cell) -> dict:
    """What a cached phase 1 must agree with before another cell may use it."""
    return {"classes": list(cell.data.train.classes),
            "train_class_counts": cell.data.class_counts,
            "val_class_counts": cell.data.val_class_counts,
            "n_test": len(cell.data.test)}


def check_phase1(phase1: Phase1, cell: Cell) -> None:
    """A loaded phase 1 must have been trained on this cell's data: same classes, counts and
    split sizes, embeddings of the right shape.  One line if not, before the run starts."""
    expected, problems = cell_facts(cell), []
    for name, value in expected.items():
        if name in phase1.summary and phase1.summary[name] != value:
            problems.append(f"{name} {phase1.summary[name]} vs {value}")
    emb = phase1.embeddings
    for split in SPLITS:
        n = len(getattr(cell.data, split))
        if emb[f"{split}_x"].shape != (n, phase1.summary["embedding_dim"]):
            problems.append(f"{split} embeddings {emb[f'{split}_x'].shape} vs "
                            f"({n}, {phase1.summary['embedding_dim']})")
    if problems:
        raise UserError(f"the cached phase 1 of run {phase1.run_id} does not match this cell "
                        f"({'; '.join(problems[:2])}); rerun with --no-cache")


# Phase-1 results this process already holds, by the run that trained them: a grid or a study
# runs many cells on one phase 1 and should not download it again for each.
_PHASE1_MEMO: OrderedDict[str, Phase1] = OrderedDict()
PHASE1_MEMO_SIZE = 4


def remember_phase1(phase1: Phase1) -> None:
    _PHASE1_MEMO[phase1.run_id] = phase1
    _PHASE1_MEMO.move_to_end(phase1.run_id)
    while len(_PHASE1_MEMO) > PHASE1_MEMO_SIZE:
        _PHASE1_MEMO.popitem(last=False)


def load_phase1(run_id: str) -> Phase1:
    """The phase-1 artifacts of ``run_id`` (from memory when this process has them)."""
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


def load_checkpoint(run_id: str) -> dict:
    folder = tracking.download_artifacts(run_id, "checkpoint")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    shutil.rmtree(folder.parent, ignore_errors=True)
    return state


# Phase 3 --------------------------------------------------------------------------------------
def retrain_head(cell: Cell, phase1: Phase1, resampler,
                 on_epoch: Callable[[int, float], None] | None = None):
    """Phase 3: resample the training embeddings, retrain the head (selected on validation
    BAC).  Returns the head, the embeddings it was trained on and the phase's summary."""
    cfg, device, run, num_classes = cell.cfg, cell.device, cell.run, cell.data.train.num_classes
    emb = phase1.embeddings
    torch.manual_seed(cfg.seed)  # a fresh head's initialisation is part of the recipe
    head = cell.loss.make_head(phase1.summary["embedding_dim"], num_classes)
    if cfg.head_recipe == "continue":
        head.load_state_dict({k[len("head."):]: v for k, v in phase1.state_dict.items()
                              if k.startswith("head.")})
    head = head.to(device)
    val_x = torch.as_tensor(emb["val_x"], dtype=torch.float32, device=device)

    def val_bac(module) -> float:
        return balanced_accuracy(emb["val_y"], predict(module, val_x).argmax(1).numpy(),
                                 num_classes)

    if not cell.method.retrains_head():
        if cfg.head_recipe != "continue":  # nothing retrains it: evaluate phase 1's own head
            head.load_state_dict({k[len("head."):]: v for k, v in phase1.state_dict.items()
                                  if k.startswith("head.")})
        head, summary = finish_head(cell, head, val_bac, {})
        return head, emb["train_x"], emb["train_y"], summary
    start = time.perf_counter()
    if resampler is None:
        train_x, train_y = emb["train_x"], emb["train_y"]
    else:
        train_x, train_y = resampler.fit_resample(emb["train_x"], emb["train_y"])
    cell.timings["resample"] = time.perf_counter() - start

    batches = TensorBatches(torch.as_tensor(train_x, dtype=torch.float32, device=device),
                            torch.as_tensor(train_y, dtype=torch.int64, device=device),
                            cfg.head_schedule.batch_size, torch.Generator().manual_seed(cfg.seed))
    plan = cell.method.head_training(cell, phase1,
                                     HeadTraining(head, batches, cfg.head_schedule))
    head = plan.module

    def log_epoch(epoch: int, record: dict) -> None:
        run.log_metrics({schema.phase(3, "train_loss"): record["train_loss"],
                         schema.phase(3, "val_bac"): record["val_bac"]}, step=epoch)
        cell.on_epoch_end("phase3", epoch, record)
        if on_epoch is not None:
            on_epoch(epoch, record["val_bac"])

    start = time.perf_counter()
    result = fit(head, plan.batches, cell.loss.head_loss(), plan.schedule,
                 lambda: val_bac(head), on_epoch=log_epoch,
                 progress="phase 3" if cell.progress else None, step=cell.method.head_step(cell))
    cell.timings["phase3"] = time.perf_counter() - start
    run.log_metrics({schema.phase(3, "best_epoch"): result.best_epoch,
                     schema.phase(3, "best_val_bac"): result.best_score})
    head, summary = finish_head(cell, head, val_bac, {"best_val_bac": result.best_score})
    return head, train_x, train_y, summary


def finish_head(cell: Cell, head, val_bac: Callable, summary: dict):
    """The method's last say on the head (``Method.final_head``); when it returns another
    head, the cell's validation BAC is that head's."""
    final = cell.method.final_head(cell, head, val_bac)
    if final is head:
        return head, summary
    return final, {**summary, "best_val_bac": val_bac(final)}


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
    metrics = {schema.test(k): v for k, v in scores.items() if k != "recall"}
    metrics.update({schema.recall(c): r for c, r in enumerate(scores["recall"])})
    metrics[schema.GAP] = gap
    metrics.update({schema.class_gap(c): g for c, g in enumerate(gap_per_class) if np.isfinite(g)})
    return metrics, cm, gap_per_class


def log_outputs(cell: Cell, phase1: Phase1, head, cm: np.ndarray, gap_per_class: np.ndarray,
                train_x: np.ndarray, train_y: np.ndarray, metrics: dict,
                synthetic_images: list[int]) -> None:
    """Artifacts of the finished cell: the final model (an MLflow model: uint8 images in,
    logits out), resampled embeddings, the per-class table and figures."""
    import pandas as pd

    cfg, classes = cell.cfg, cell.data.train.classes
    real = np.asarray(cell.data.class_counts)
    final = np.bincount(train_y, minlength=len(classes))
    table = pd.DataFrame({
        "class": classes, "train_real": real, "train_synthetic_images": synthetic_images,
        "train_synthetic_embeddings": final - real, "val": cell.data.val_class_counts,
        "test_recall": [metrics[schema.recall(c)] for c in range(len(classes))],
        "test_support": cm.sum(axis=1), "gap": gap_per_class})
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp, "per_class.csv"), index=False)
        # The final head alone (small); the extractor's weights are in phase1/ of the run
        # that trained it, and the whole model in the MLflow model.
        torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()},
                   Path(tmp, "head.pt"))
        if len(train_x) > len(phase1.embeddings["train_x"]):
            np.savez_compressed(Path(tmp, "resampled_train.npz"), x=train_x, y=train_y)
        plot_confusion(cm, classes, Path(tmp, "confusion_matrix.png"))
        plot_recall(table, cell_tag(cfg), Path(tmp, "recall_by_class.png"))
        cell.run.log_artifacts(tmp, "results")
    cell.run.log_table(table.assign(gap=table["gap"].where(np.isfinite(table["gap"]))),
                       "results/per_class.json")
    if cfg.log_model or cfg.register:
        cell.run.log_model(final_model(cell, phase1, head), cell.data.test.images[:2].numpy(),
                           register=cfg.register)


def final_model(cell: Cell, phase1: Phase1, head) -> ImageClassifier:
    """The evaluated model as one module: phase 1's extractor (without training-only parts a
    method inserted), the final head and the normalisation."""
    extractor = phase1_extractor(cell, phase1, torch.device("cpu"))
    return ImageClassifier(extractor, copy.deepcopy(head).cpu(), cell.data.mean, cell.data.std)


def plot_recall(table, title: str, path: Path) -> None:
    """Test recall per class as bars, classes labelled with their training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c}\n({n})" for c, n in zip(table["class"], table["train_real"])]
    width = min(16.0, max(5.0, 0.45 * len(labels)))
    fig, ax = plt.subplots(figsize=(width, 3.8))
    ax.bar(range(len(labels)), table["test_recall"], color="tab:blue")
    ax.set_xticks(range(len(labels)), labels if len(labels) <= 30 else [""] * len(labels),
                  fontsize=7)
    low = float(table["test_recall"].min())
    ax.set_ylim(max(0.0, low - 0.1) if low > 0.2 else 0.0, 1.0)
    ax.set_ylabel("test recall")
    ax.set_xlabel("class (training images)")
    ax.set_title(f"Test recall per class: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    ax.set_title("Test confusion matrix\n(colour: row-normalised; numbers: counts)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cell(cfg: RunConfig, *, reuse_phase1: bool = True, progress: bool = True,
             tags: dict[str, str] | None = None, evaluate_test: bool = True,
             on_head_epoch: Callable[[int, float], None] | None = None,
             run_name: str | None = None) -> dict:
    """Run one cell end to end and log it; returns its metrics, run id and provenance.

    Everything a user can get wrong (names, numbers, missing data, an empty class, a method
    that cannot work on these class counts, a cached stage that does not match) is checked
    before the MLflow run starts, so a mistake leaves no run behind; the one mistake that
    only computing can show (a training set a sampler cannot over-sample) moves the run it
    met to MLflow's trash.  Work that can fail, the method's training-set stage (a generator
    that diverges or collapses) included, runs inside the run, which then ends FAILED with
    the reason.  A phase 1 that a killed run left checkpointed resumes from its checkpoint.
    ``evaluate_test=False`` (tuning trials) stops at the validation score and never touches
    the test set; ``on_head_epoch(epoch, val_bac)`` sees every phase-3 epoch and may raise to
    stop the run (a pruned trial), which then ends KILLED.
    """
    started = time.perf_counter()
    cfg = cfg.resolved()
    method = cfg.method_instance()
    data = prepare_data(cfg)
    for note in method.adapt(data.class_counts):
        print(f"note: {method.name}: {note}", file=sys.stderr)
    device = pick_device(cfg.device)
    loss = LOSSES.create(cfg.loss, class_counts=data.class_counts, schedule=cfg.schedule,
                         **cfg.loss_params)
    diagnostics = chosen_diagnostics(cfg.diagnostics)
    cell = Cell(cfg=cfg, method=method, data=data, device=device, loss=loss, progress=progress,
                callbacks=[method, *diagnostics])
    resampler = method.embedding_resampler(random_state=cfg.seed)
    if resampler is not None and device.type == "cuda" and "device" in resampler.get_params():
        resampler.set_params(device=str(device))  # a sampler's neighbour search on the GPU
    key, training_key = cfg.phase1_key(), cfg.training_set_key()
    source_run = tracking.find_phase1_run(key) if reuse_phase1 else None
    resume_run = tracking.find_resumable_run(key) if source_run is None and reuse_phase1 else None
    resume = load_checkpoint(resume_run) if resume_run is not None else None
    training_set = None
    if source_run is None:
        training_set = cached_training_set(cell, training_key, reuse=reuse_phase1)
        model, phase1 = build_model(cell), None
    else:
        phase1 = load_phase1(source_run)
        check_phase1(phase1, cell)
        model = None

    run_name = run_name or f"{cfg.method}-{cfg.loss}-{cfg.dataset}-s{cfg.seed}"
    tracked = tracking.TrackedRun(cfg.experiment, run_name, {
        tracking.TAG_PHASE1_KEY: key, "method": cfg.method, "loss": cfg.loss,
        "dataset": cfg.dataset, "backbone": cfg.backbone, schema.TAG_CELL: cell_tag(cfg),
        schema.TAG_SEED: str(cfg.seed), **(tags or {})},
        system_metrics=cfg.system_metrics, experiment_description=CELLS_DESCRIPTION)
    try:
        with tracked as run:
            cell.run = run
            log_cell_params(cell, key)
            start = time.perf_counter()
            if phase1 is None:
                if training_set is None:
                    training_set = compute_training_set(cell, training_key)
                log_training_set(cell, training_key, training_set)
                if resume_run is not None:
                    run.set_tags({"resumed_from_run": resume_run,
                                  "resumed_at_epoch": str(resume["epoch"])})
                phase1 = train_phase1(cell, model, training_set, resume)
                cell.timings["phase1_load"] = 0.0
            else:
                run.set_tags({tracking.TAG_PHASE1_RUN: phase1.run_id})
                cell.timings.update(phase1=phase1.summary["time_phase1_s"],
                                    phase2=phase1.summary["time_phase2_s"],
                                    phase1_load=time.perf_counter() - start)
                if training_key is not None:
                    cell.timings.update(reused_training_set_timings(phase1.summary))
            extra = method.phase2_outputs(cell, phase1)
            head, train_x, train_y, phase3 = retrain_head(cell, phase1, resampler, on_head_epoch)
            metrics = {schema.VAL_BAC: phase3.get("best_val_bac", phase1.summary["best_val_bac"]),
                       **{schema.time(stage): seconds for stage, seconds in cell.timings.items()}}
            results = {"phase1": phase1, "head": head, "train_x": train_x, "train_y": train_y,
                       "phase2_outputs": extra, "resampler": resampler,
                       "training_set": training_set.images if training_set is not None else None}
            if evaluate_test:
                test_metrics, cm, gap_per_class = evaluate(head, phase1, train_x, train_y,
                                                           data.train.classes, device)
                metrics.update(test_metrics)
                synthetic = training_set.synthetic_counts if training_set is not None else \
                    phase1.summary.get("synthetic_images", [0] * data.train.num_classes)
                log_outputs(cell, phase1, head, cm, gap_per_class, train_x, train_y,
                            test_metrics, synthetic)
                results.update(metrics=test_metrics, confusion=cm)
            run.describe(run_description(cell, metrics, phase1, evaluate_test, training_set))
            method.on_cell_end(cell, results)
            if evaluate_test:
                run_diagnostics(cell, results, diagnostics)
            metrics[schema.WALL_TIME] = time.perf_counter() - started
            run.log_metrics(metrics)
    except UserError:
        if tracked.run_id is not None:
            tracking.delete_run(tracked.run_id)
        raise
    return {"run_id": run.run_id, "phase1_run_id": phase1.run_id,
            "phase1_reused": source_run is not None, "resumed_from": resume_run,
            "metrics": metrics, "experiment": run.experiment, "config": cfg}


def reused_training_set_timings(summary: dict) -> dict[str, float]:
    """The training-set stage times a reused phase 1 recorded (runs that predate sub-stage
    times recorded only ``time_training_set_s``)."""
    if "training_set_timings" in summary:
        return summary["training_set_timings"]
    return {"training_set": summary["time_training_set_s"]} \
        if "time_training_set_s" in summary else {}


def phase1_of(cfg: RunConfig, cell: Cell, *, progress: bool = False,
              evaluate_test: bool = True, tags: dict[str, str] | None = None) -> Phase1:
    """The phase 1 of the cell ``cfg``, which reads the same data as ``cell`` (a method's hook
    asking for another cell's model: the ``none`` model of its own cell, say): from the stage
    cache, else trained by running that cell (its own run, nested in the active one), so that
    a later run of it reuses this one; checked against ``cell``'s data either way."""
    cfg = cfg.resolved()
    run_id = tracking.find_phase1_run(cfg.phase1_key())
    if run_id is None:
        run_id = run_cell(cfg, progress=progress, evaluate_test=evaluate_test,
                          tags=tags)["phase1_run_id"]
    phase1 = load_phase1(run_id)
    check_phase1(phase1, cell)
    return phase1


def phase1_extractor(cell: Cell, phase1: Phase1,
                     device: torch.device | None = None) -> torch.nn.Module:
    """The feature extractor of ``phase1`` (of a cell with ``cell``'s data and backbone),
    without training-only parts a method inserted, in evaluation mode on ``device`` (default:
    the cell's)."""
    cfg = cell.cfg
    extractor = BACKBONES.create(cfg.backbone, in_channels=cell.data.train.images.shape[1],
                                 image_size=cfg.image_size, **cfg.backbone_params)
    extractor.load_state_dict({k[len("extractor."):]: v for k, v in phase1.state_dict.items()
                               if k.startswith("extractor.")})
    return extractor.to(device or cell.device).eval()


def embed(cell: Cell, extractor: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """The pooled embeddings of uint8 ``images`` under ``extractor``, normalised as phase 1
    normalises the cell's images."""
    return predict(extractor, images.to(cell.device), transform=normalizer(cell)).numpy()


CELLS_DESCRIPTION = (
    "Benchmark cells of eos-benchmark: one run per dataset, backbone, loss, method and seed. "
    "Group by the `cell` tag to average seeds; `test/*` are the final model's scores on the "
    "balanced test set, `phase1/*` and `phase3/*` the training curves, `time/*` seconds per stage.")


def cell_tag(cfg: RunConfig) -> str:
    settings = {**cfg.method_params, **{f"loss.{k}": v for k, v in cfg.loss_params.items()},
                **{f"backbone.{k}": v for k, v in cfg.backbone_params.items()}}
    return schema.cell_label(cfg.dataset, cfg.profile, cfg.ratio, cfg.backbone, cfg.loss,
                             cfg.method, settings)


def run_description(cell: Cell, metrics: dict, phase1: Phase1, tested: bool,
                    training_set: TrainingSet | None = None) -> str:
    """The run's note: its headline numbers and where its phase 1 came from."""
    cfg = cell.cfg
    lines = [f"**{cell_tag(cfg)}**, seed {cfg.seed}", ""]
    if tested:
        lines.append(" | ".join(f"{name} **{metrics[schema.test(score)]:.4f}**" for name, score in
                                (("BAC", "bac"), ("GM", "gm"), ("GM macro", "gm_macro"),
                                 ("F1", "f1_macro"))) + " (test)")
    else:
        lines.append(f"validation BAC **{metrics[schema.VAL_BAC]:.4f}** (not evaluated on test)")
    if phase1.run_id == cell.run.run_id:
        lines.append("\nPhase 1 trained in this run.")
    else:
        lines.append(f"\nPhase 1 reused from [run {phase1.run_id}]"
                     f"({tracking.run_link(phase1.run_id)}).")
    if training_set is not None and training_set.reused and training_set.run_id != cell.run.run_id:
        lines.append(f"\nTraining set ({', '.join(sorted(training_set.timings))}) reused from "
                     f"[run {training_set.run_id}]({tracking.run_link(training_set.run_id)}): "
                     f"its stage times are that run's.")
    if cell.method.notes or cell.data.validation_note:
        lines.append("\nNotes: " + "; ".join(cell.method.notes + (
            [f"validation: {cell.data.validation_note}"] if cell.data.validation_note else [])))
    return "\n".join(lines)


def log_cell_params(cell: Cell, key: str) -> None:
    """Every setting in force: the configuration, each component's effective
    hyper-parameters (defaults included), the data's counts and where they came from."""
    cfg, data, run = cell.cfg, cell.data, cell.run
    digest = run.log_training_subset(
        data.train_indices, data.train.labels.numpy(),
        name=f"{cfg.dataset}-{cfg.profile}{cfg.ratio:g}-subset{cfg.subset_seed}",
        source={"dataset": cfg.dataset, "profile": cfg.profile, "ratio": str(cfg.ratio),
                "subset_seed": str(cfg.subset_seed), "validation": data.validation})
    backbone_factory = BACKBONES.get(cfg.backbone)
    backbone_defaults = {
        name: p.default for name, p in inspect.signature(backbone_factory).parameters.items()
        if p.default is not p.empty and name not in SUITE_BACKBONE_ARGS}
    run.log_params({**cfg.as_params(),
                    **{f"loss_hparam.{k}": v for k, v in cell.loss.params.items()},
                    **{f"method_hparam.{k}": v for k, v in cell.method.hyperparameters().items()},
                    **{f"backbone_hparam.{k}": v
                       for k, v in {**backbone_defaults, **cfg.backbone_params}.items()},
                    "device_used": cell.device.type, "num_classes": data.train.num_classes,
                    "n_train": len(data.train), "n_val": len(data.val),
                    "n_test": len(data.test), "profile_counts": data.profile_counts,
                    "train_class_counts": data.class_counts,
                    "val_class_counts": data.val_class_counts,
                    "validation_used": data.validation,
                    "subset_fingerprint": fingerprint(data.train_indices),
                    "val_fingerprint": fingerprint(data.val_indices),
                    "subset_digest": digest, "phase1_key": key,
                    **{f"dataset.{k}": v for k, v in DATASETS.create(
                        cfg.dataset, root=cfg.data_root).params.items()}})
    notes = [f"validation: {data.validation_note}"] if data.validation_note else []
    notes += cell.method.notes
    if notes:
        run.set_tags({"notes": "; ".join(notes)[:5000]})
