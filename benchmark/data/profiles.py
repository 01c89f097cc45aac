"""Long-tailed profiles, the draw of the training subset, and stratified and balanced splits."""
from __future__ import annotations

import hashlib

import numpy as np

from benchmark.errors import UserError

PROFILES = ("exp", "step", "natural")


def profile_counts(profile: str, available: list[int], ratio: float, mu: float = 0.5) -> list[int]:
    """Images kept per class, given the images ``available`` per class of the training pool.

    ``exp`` decays as ``n_max * ratio**(-i/(C-1))`` and ``step`` keeps ``n_max`` for the
    first ``1 - mu`` share of classes and ``int(n_max / ratio)`` for the rest, where ``n_max``
    is the smallest class of the pool (every class can then supply its count); ``natural``
    keeps the pool as it is (a user's already imbalanced data) and ignores ``ratio``.
    """
    if ratio < 1:
        raise UserError(f"imbalance ratio must be at least 1, got {ratio}")
    num_classes, n_max = len(available), int(min(available))
    if profile == "natural":
        return [int(n) for n in available]
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * ratio ** (-i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        n_minority = int(round(num_classes * mu))
        n_major = num_classes - n_minority
        return [int(n_max)] * n_major + [int(n_max / ratio)] * n_minority
    raise UserError(f"unknown profile '{profile}'; valid profiles: {', '.join(PROFILES)}")


def check_counts(counts: list[int], classes: list[str]) -> None:
    empty = [str(classes[i]) if i < len(classes) else str(i) for i, n in enumerate(counts) if n < 1]
    if empty:
        raise UserError(
            f"the imbalance profile leaves class(es) {', '.join(empty)} empty "
            f"(counts {counts}); lower the ratio"
        )


def draw_per_class(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices of ``counts[c]`` images of each class c, drawn without replacement, sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c, n in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if n > len(members):
            raise UserError(f"class {c} has {len(members)} images, the profile asks for {n}")
        chosen.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``labels``) of the kept and held-out parts: ``fraction`` of every class,
    at least one image held out and at least one kept wherever the class has two or more."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(fraction * len(members)))
        n_held = min(max(n_held, 1), len(members) - 1) if len(members) > 1 else 0
        held.append(members[:n_held])
        keep.append(members[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def fingerprint(indices: np.ndarray) -> str:
    """A short digest naming an exact subset of a dataset."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
