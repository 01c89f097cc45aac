"""RQ1 of the CNN-fragility paper: the imbalanced extractor's head retrained on a balanced pool."""
from __future__ import annotations

import sys
import time

import numpy as np

from benchmark.errors import UserError
from benchmark.methods import Method
from benchmark.registry import METHODS

# Keeps the draw of pool images apart from the other draws that use the subset seed.
POOL_STREAM = 2


class HeldBackImages:
    """A resampler in imbalanced-learn's shape whose new rows are real: ``fit_resample(X, y)``
    returns ``X, y`` followed by the embeddings ``BalancedHead.phase2_outputs`` prepared (pool
    images the long-tailed subset left out)."""

    def __init__(self):
        self.extra_x: np.ndarray | None = None
        self.extra_y: np.ndarray | None = None

    def fit_resample(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.extra_x is None:
            raise RuntimeError("the pool's embeddings are made in phase2_outputs, which has "
                               "not run for this cell")
        return (np.concatenate([X, self.extra_x.astype(X.dtype, copy=False)]),
                np.concatenate([y, self.extra_y.astype(y.dtype, copy=False)]))


def pool_top_up(labels: np.ndarray, train_indices: np.ndarray, val_indices: np.ndarray,
                seed: int) -> np.ndarray:
    """Indices into the pool (``labels``) that bring every class of the training subset up to
    the subset's largest class, drawn without replacement from the images neither the subset
    nor the validation set uses (a class whose pool has fewer spare images gets them all).
    Sorted by class, then drawn order."""
    num_classes = int(labels.max()) + 1
    used = np.zeros(len(labels), dtype=bool)
    used[train_indices] = True
    used[val_indices] = True
    counts = np.bincount(labels[train_indices], minlength=num_classes)
    rng = np.random.default_rng([seed, POOL_STREAM])
    chosen = []
    for c in range(num_classes):
        spare = np.flatnonzero((labels == c) & ~used)
        wanted = min(int(counts.max() - counts[c]), len(spare))
        chosen.append(rng.choice(spare, size=wanted, replace=False))
    return np.concatenate(chosen).astype(np.int64)


@METHODS.register("balanced-head")
class BalancedHead(Method):
    """RQ1 of the CNN-fragility paper: the phase-1 head retrained on real pool images topping every class up to the largest."""

    # What the rows beyond the real subset are, for the diagnostics' figures.
    added_points = "pool images"

    def __init__(self, **params):
        super().__init__(**params)
        self.pool = HeldBackImages()

    def embedding_resampler(self, random_state: int) -> HeldBackImages:
        return self.pool

    def phase2_outputs(self, cell, phase1) -> dict[str, np.ndarray]:
        """Embed, with phase 1's extractor (the imbalanced one), the pool images that balance
        the training set; the head is then retrained on the subset plus these."""
        import torch

        from benchmark.pipeline import final_model, load_dataset, resize
        from benchmark.train import predict

        cfg, data = cell.cfg, cell.data
        start = time.perf_counter()
        pool, _ = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
        labels = pool.labels.numpy()
        chosen = pool_top_up(labels, data.train_indices, data.val_indices, cfg.subset_seed)
        if not len(chosen):
            raise UserError(f"method '{self.name}' needs pool images that the training subset "
                            f"and validation set leave unused; this cell uses them all "
                            f"(profile {cfg.profile})")
        images = resize(pool.images[torch.from_numpy(chosen)], cfg.image_size)
        extractor = final_model(cell, phase1, torch.nn.Identity()).to(cell.device)
        self.pool.extra_x = predict(extractor, images.to(cell.device)).numpy()
        self.pool.extra_y = labels[chosen]
        cell.timings["pool_embedding"] = time.perf_counter() - start

        totals = np.asarray(data.class_counts) + np.bincount(labels[chosen],
                                                             minlength=len(data.class_counts))
        if cell.run is not None:
            cell.run.log_params({"balanced_pool_counts": totals.tolist()})
        if totals.min() < totals.max():
            note = (f"the pool's spare images top its classes up to {totals.min()}..."
                    f"{totals.max()}, not all to {totals.max()}")
            self.notes.append(note)
            print(f"note: {self.name}: {note}", file=sys.stderr)
        return {"balanced_pool_indices": chosen}
