"""Pixel-space over-sampling: imbalanced-learn style samplers on flattened uint8 training images.

``resample_images`` feeds the images to a sampler as one float32 matrix (half the memory of the
float64 that imbalanced-learn would otherwise be handed) and turns the synthetic rows back into
uint8 images in chunks, so no second full-size float copy is made on the way out.

What the samplers return was read in their source (imbalanced-learn 0.14, ``benchmark.eos``)
and is checked on every call: SMOTE, BorderlineSMOTE, SVMSMOTE and EOS all return the input rows
first, unchanged and in order, then the new rows.  A sampler that returns the originals in
another order is handled by matching rows; one that drops or alters an original is refused.
``FitOnceSVC`` removes SVMSMOTE's repeated, identical SVM fits (one per over-sampled class).

Memory of the samplers themselves (float32 input, D = C * H * W): SMOTE makes its new rows
class by class (a float64 temporary of one class's new rows), BorderlineSMOTE and SVMSMOTE grow
their output by ``np.vstack`` once per class (briefly two copies of the output), SVMSMOTE's SVC
copies the input to float64 for libsvm, and EOS builds all new rows at once from float32
gathers (about four temporaries the size of the new rows).  ``python -m benchmark.pixel_speed``
measures the peaks.
"""
from __future__ import annotations

import weakref
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import SVC

# Rows converted to uint8 per step: a 12 MB float32 block for 32x32 RGB images.
CONVERT_ROWS = 1024


def resample_images(images: torch.Tensor, labels: torch.Tensor,
                    sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-sample uint8 ``[N, C, H, W]`` images with ``sampler.fit_resample`` on their pixels.

    Returns ``(images', labels')``: the N input images and labels unchanged and in their order,
    followed by the synthetic images (rounded to the nearest integer and clipped to [0, 255],
    uint8, same C, H, W) and their int64 labels, in the order the sampler made them.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} "
                         f"{list(images.shape)}")
    if images.device.type != "cpu" or labels.device.type != "cpu":
        raise ValueError("resample_images works on CPU tensors; move the images there first")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be one per image, shape [{len(images)}], "
                         f"got {list(labels.shape)}")
    n, image_shape = len(images), tuple(images.shape[1:])
    pixels = images.reshape(n, -1).numpy().astype(np.float32)
    targets = labels.numpy()
    resampled, resampled_labels = sampler.fit_resample(pixels, targets)
    resampled, resampled_labels = np.asarray(resampled), np.asarray(resampled_labels)
    if resampled.ndim != 2 or resampled.shape[1] != pixels.shape[1] \
            or len(resampled) != len(resampled_labels):
        raise ValueError(f"{type(sampler).__name__} returned {resampled.shape} rows for "
                         f"{len(resampled_labels)} labels; expected [*, {pixels.shape[1]}]")
    synthetic_rows = rows_not_original(pixels, targets, resampled, resampled_labels, sampler)
    del pixels
    synthetic = rows_to_uint8(resampled, synthetic_rows)
    synthetic_labels = torch.from_numpy(
        resampled_labels[synthetic_rows].astype(np.int64, copy=False))
    del resampled
    return (torch.cat([images, torch.from_numpy(synthetic).reshape(-1, *image_shape)]),
            torch.cat([labels.to(torch.int64), synthetic_labels]))


def rows_not_original(pixels: np.ndarray, targets: np.ndarray, resampled: np.ndarray,
                      resampled_labels: np.ndarray, sampler) -> slice | np.ndarray:
    """Which rows of a sampler's output are new: every row after the originals, or, where the
    sampler moved the originals, the rows left once each original is matched to one output row.
    """
    n = len(pixels)
    if len(resampled) >= n and np.array_equal(resampled_labels[:n], targets) \
            and all(np.array_equal(resampled[start:start + CONVERT_ROWS],
                                   pixels[start:start + CONVERT_ROWS])
                    for start in range(0, n, CONVERT_ROWS)):
        return slice(n, len(resampled))
    # Originals moved: match on exact float32 bytes and label; identical rows are
    # interchangeable, so matching any one of them is as good as matching the right one.
    unmatched = defaultdict(deque)
    for index in range(n):
        unmatched[(targets[index].item(), pixels[index].tobytes())].append(index)
    resampled = np.ascontiguousarray(resampled, dtype=np.float32)
    new_rows = []
    for row in range(len(resampled)):
        waiting = unmatched.get((resampled_labels[row].item(), resampled[row].tobytes()))
        if waiting:
            waiting.popleft()
        else:
            new_rows.append(row)
    missing = sum(len(waiting) for waiting in unmatched.values())
    if missing:
        raise ValueError(f"{type(sampler).__name__} dropped or altered {missing} of the {n} "
                         "original images; pixel over-sampling needs a pure over-sampler")
    return np.asarray(new_rows, dtype=np.int64)


def rows_to_uint8(resampled: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """The chosen rows rounded half to even, clipped to [0, 255], as uint8, a block at a time."""
    index = np.arange(len(resampled))[rows]
    out = np.empty((len(index), resampled.shape[1]), dtype=np.uint8)
    for start in range(0, len(index), CONVERT_ROWS):
        block = resampled[index[start:start + CONVERT_ROWS]]
        if not np.isfinite(block).all():
            raise ValueError("the sampler produced non-finite pixel values")
        np.clip(np.rint(block, out=block), 0, 255, out=block)
        out[start:start + len(block)] = block
    return out


class FitOnceSVC(SVC):
    """An SVC that skips refitting on the very arrays it was last fitted on.

    imbalanced-learn's SVMSMOTE refits its SVM on the whole, unchanged training set once per
    class it over-samples (nine identical fits for CIFAR-10-LT); an SVC without probability
    estimates is deterministic, so the refits only cost time.  Pass
    ``SVMSMOTE(svm_estimator=FitOnceSVC(gamma="scale", random_state=seed))`` for the same
    output as SVMSMOTE's default SVC with one fit.  "Very arrays" means the same objects (held
    by weak reference), which must not be modified in between; anything else refits.
    """

    def fit(self, X, y, sample_weight=None):
        last = getattr(self, "_fitted_on", None)
        if sample_weight is None and last is not None and last[0]() is X and last[1]() is y:
            return self
        super().fit(X, y, sample_weight)
        self._fitted_on = None
        if sample_weight is None:
            try:
                self._fitted_on = (weakref.ref(X), weakref.ref(y))
            except TypeError:  # lists and other objects without weak references: always refit
                pass
        return self


def synthetic_counts(labels_before, labels_after, num_classes: int) -> list[int]:
    """Images added per class: counts in ``labels_after`` minus counts in ``labels_before``."""
    before = torch.bincount(torch.as_tensor(labels_before).flatten(), minlength=num_classes)
    after = torch.bincount(torch.as_tensor(labels_after).flatten(), minlength=num_classes)
    if len(before) > num_classes or len(after) > num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    added = (after - before).tolist()
    if min(added, default=0) < 0:
        raise ValueError(f"labels_after has fewer images than labels_before in some class: "
                         f"{added}")
    return added


def plot_sample_grid(real: torch.Tensor, real_labels, synthetic: torch.Tensor,
                     synthetic_labels, classes: list[str], path, per_class: int = 8) -> None:
    """Save one PNG: per class a row of up to ``per_class`` real then synthetic images.

    Images are uint8 ``[N, C, H, W]`` with C = 1 (grey) or 3 (colour).  The first images of
    each class are shown, in order; missing ones are left as blank (hatched) slots.  The real
    and synthetic blocks sit in separate, titled columns; each row names its class and how many
    real and synthetic images it has.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_labels = torch.as_tensor(real_labels).flatten()
    synthetic_labels = torch.as_tensor(synthetic_labels).flatten()
    for name, images, labels in (("real", real, real_labels),
                                 ("synthetic", synthetic, synthetic_labels)):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{name} images must be uint8 [N, 1 or 3, H, W], got "
                             f"{images.dtype} {list(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{name} images need one label each")
    if len(synthetic) and real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"real and synthetic images differ in shape: {list(real.shape[1:])} "
                         f"vs {list(synthetic.shape[1:])}")
    if per_class < 1:
        raise ValueError("per_class must be at least 1")

    height, width = real.shape[2:]
    rows = len(classes)
    # Cells of about 0.45 in, room on the left for the class names and on top for the titles.
    cell = 0.45
    fig, axes = plt.subplots(rows, 2, squeeze=False, layout="constrained",
                             figsize=(2 * per_class * cell + 2.2,
                                      rows * (cell * height / (width + 1) + 0.1) + 0.8))
    for klass, name in enumerate(classes):
        real_of = real[real_labels == klass]
        synthetic_of = synthetic[synthetic_labels == klass]
        for column, images in ((0, real_of), (1, synthetic_of)):
            ax = axes[klass, column]
            ax.imshow(strip(images[:per_class], per_class), interpolation="nearest",
                      extent=(0, per_class * (width + 1), height, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            for blank in range(len(images), per_class):
                ax.add_patch(matplotlib.patches.Rectangle(
                    (blank * (width + 1), 0), width, height, fill=False, hatch="///",
                    edgecolor="0.75", linewidth=0))
        axes[klass, 0].set_ylabel(f"{name}\n{len(real_of)} real, {len(synthetic_of)} synth.",
                                  rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_title(f"real (first {per_class})", fontsize=10)
    axes[0, 1].set_title(f"synthetic (first {per_class})", fontsize=10)
    for ax in axes[:, 1]:
        for spine in ax.spines.values():
            spine.set_edgecolor("tab:red")
            spine.set_linewidth(1.5)
    fig.suptitle(f"Real and synthetic training images per class ({height}x{width} pixels)",
                 fontsize=11)
    # Enough dots that every image keeps at least its own pixel count.
    fig.savefig(Path(path), dpi=max(110, int(1.3 * width / cell)), bbox_inches="tight")
    plt.close(fig)


def strip(images: torch.Tensor, slots: int) -> np.ndarray:
    """``slots`` images side by side as one RGB uint8 array, 1-pixel white gaps, white blanks."""
    _, channels, height, width = images.shape
    canvas = np.full((height, slots * (width + 1) - 1, 3), 255, dtype=np.uint8)
    for slot, image in enumerate(images.numpy()):
        rgb = np.repeat(image, 3, axis=0) if channels == 1 else image
        left = slot * (width + 1)
        canvas[:, left:left + width] = rgb.transpose(1, 2, 0)
    return canvas
