"""Imbalance profiles, the subset draw and the splits."""
import numpy as np
import pytest

from benchmark.data.profiles import (check_counts, draw_per_class, fingerprint, profile_counts,
                                     stratified_split)
from benchmark.errors import UserError


def test_exp_profile_reproduces_cifar10_counts():
    assert profile_counts("exp", [5000] * 10, 100) == [
        5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(profile_counts("exp", [5000] * 10, 100)) == 12406
    assert profile_counts("exp", [5000] * 10, 50) == [
        5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


def test_step_and_natural_profiles():
    assert profile_counts("step", [5000] * 10, 10) == [5000] * 5 + [500] * 5
    assert profile_counts("natural", [7, 3, 5], 1) == [7, 3, 5]
    # n_max is the smallest class of the pool, so every class can supply its count.
    assert profile_counts("exp", [120, 100, 130], 1) == [100, 100, 100]


def test_bad_ratio_and_empty_class_are_user_errors():
    with pytest.raises(UserError, match="at least 1"):
        profile_counts("exp", [10] * 3, 0.5)
    counts = profile_counts("exp", [10] * 3, 100)
    assert counts[-1] == 0
    with pytest.raises(UserError, match="empty"):
        check_counts(counts, ["a", "b", "c"])


def test_draw_is_seeded_and_exact():
    labels = np.repeat(np.arange(3), 20)
    a = draw_per_class(labels, [10, 5, 2], seed=1)
    b = draw_per_class(labels, [10, 5, 2], seed=1)
    c = draw_per_class(labels, [10, 5, 2], seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [10, 5, 2]
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_stratified_split_holds_out_every_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 1, 1, 0]
    assert np.bincount(labels[keep], minlength=4).tolist() == [8, 4, 1, 1]
