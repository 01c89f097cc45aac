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


VALIDATIONS = ("auto", "balanced", "fraction")
# Keeps the validation draw apart from the subset draw that uses the same subset seed.
VALIDATION_STREAM = 1


def validation_shortfall(labels: np.ndarray, subset: np.ndarray, per_class: int) -> list[int]:
    """Per class, how many of ``per_class`` validation images the pool's unused images cannot
    supply (and so would come out of that class's training subset)."""
    in_subset = np.zeros(len(labels), dtype=bool)
    in_subset[subset] = True
    spare = np.bincount(labels[~in_subset], minlength=labels.max() + 1)
    return [max(0, per_class - int(n)) for n in spare]


def choose_validation(labels: np.ndarray, subset: np.ndarray, per_class: int) -> tuple[str, str]:
    """What ``validation="auto"`` uses, and why when it is not ``"balanced"``.

    ``"balanced"`` needs a pool with something to spare: some class with unused images, and
    no class giving up more than half of its training subset to the validation set.  Otherwise
    (a user's folder on the natural profile uses every image) a stratified ``"fraction"`` of
    the subset is held out, as before."""
    shortfall = validation_shortfall(labels, subset, per_class)
    subset_counts = np.bincount(labels[subset], minlength=len(shortfall))
    if all(s == per_class for s in shortfall):
        return "fraction", "the profile uses every image of the pool, none is left to validate on"
    starved = [c for c, (s, n) in enumerate(zip(shortfall, subset_counts)) if s > n / 2]
    if starved:
        c = starved[0]
        return "fraction", (f"class {c} would give {shortfall[c]} of its {subset_counts[c]} "
                            f"training images to a balanced validation set")
    return "balanced", ""


def balanced_validation(labels: np.ndarray, subset: np.ndarray, per_class: int,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices (into the pool): ``per_class`` validation images of
    every class, drawn first from the pool's images that the subset did not use; a class
    without enough of them (the head class, which uses all of its images) gives the shortfall
    out of its own subset, and only that class does.  Both sorted; they never overlap."""
    rng = np.random.default_rng([seed, VALIDATION_STREAM])
    in_subset = np.zeros(len(labels), dtype=bool)
    in_subset[subset] = True
    val, from_subset = [], []
    for c in range(int(labels.max()) + 1):
        unused = rng.permutation(np.flatnonzero((labels == c) & ~in_subset))
        members = rng.permutation(np.flatnonzero((labels == c) & in_subset))
        taken = unused[:per_class]
        short = per_class - len(taken)
        if short >= len(members):
            raise UserError(f"class {c} has {len(unused) + len(members)} images: too few for "
                            f"{per_class} validation images and at least one to train on "
                            f"(lower --val-per-class)")
        val.extend([taken, members[:short]])
        from_subset.append(members[:short])
    train = np.setdiff1d(subset, np.concatenate(from_subset))
    return np.sort(train), np.sort(np.concatenate(val))


def fingerprint(indices: np.ndarray) -> str:
    """A short digest naming an exact subset of a dataset."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
