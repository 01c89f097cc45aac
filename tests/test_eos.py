"""EOS: geometry of every synthetic point, balance, determinism, fallback, the reference rule,
and its exact chunked neighbour search against scikit-learn's."""
import hashlib

import numpy as np
import pytest
from imblearn.pipeline import make_pipeline
from imblearn.utils.estimator_checks import parametrize_with_checks
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors

from benchmark import expansion
from benchmark.eos import EOS
from benchmark.expansion import k_nearest, write_segments


def brute_force_neighbours(X, k):
    """Each point's k nearest other points, by exhaustive distance computation."""
    d = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def blobs(seed=0):
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(0, 1, (60, 4)), rng.normal(1.5, 1, (15, 4)),
                   rng.normal(-1.5, 1, (6, 4))])
    y = np.repeat([0, 1, 2], [60, 15, 6])
    return X, y


def on_enemy_segment(point, cls, X, y, neighbours, tol=1e-9):
    """Is ``point`` on a segment from a class-``cls`` base to an enemy among its neighbours?"""
    for base in np.flatnonzero(y == cls):
        for partner in neighbours[base]:
            if y[partner] == cls:
                continue
            direction = X[partner] - X[base]
            r = np.dot(point - X[base], direction) / np.dot(direction, direction)
            if -tol <= r <= 1 + tol and np.allclose(X[base] + r * direction, point, atol=1e-7):
                return True
    return False


@pytest.mark.parametrize("k", [1, 5, 10])
def test_every_synthetic_point_lies_toward_a_nearest_enemy(k):
    X, y = blobs()
    X_res, y_res = EOS(k_neighbors=k, random_state=0).fit_resample(X, y)
    neighbours = brute_force_neighbours(X, k)
    synthetic, labels = X_res[len(X):], y_res[len(X):]
    assert len(synthetic) == (60 - 15) + (60 - 6)
    for point, cls in zip(synthetic, labels):
        assert on_enemy_segment(point, cls, X, y, neighbours)


def test_recorded_bases_partners_and_steps_explain_the_output():
    X, y = blobs()
    sampler = EOS(k_neighbors=5, max_step=0.3, random_state=3)
    X_res, y_res = sampler.fit_resample(X, y)
    neighbours = brute_force_neighbours(X, 5)
    base, partner, step = sampler.base_indices_, sampler.partner_indices_, sampler.steps_
    assert np.allclose(X_res[len(X):], X[base] + step[:, None] * (X[partner] - X[base]))
    assert np.all(y[partner] != y[base]) and np.array_equal(y_res[len(X):], y[base])
    assert all(p in neighbours[b] for b, p in zip(base, partner))
    assert step.min() >= 0 and step.max() <= 0.3
    assert np.array_equal(X_res[:len(X)], X)


def test_classes_are_balanced_after_resampling():
    X, y = blobs()
    _, y_res = EOS(random_state=0).fit_resample(X, y)
    assert np.bincount(y_res).tolist() == [60, 60, 60]


def test_same_seed_same_output_other_seed_other_output():
    X, y = blobs()
    a = EOS(random_state=7).fit_resample(X, y)[0]
    b = EOS(random_state=7).fit_resample(X, y)[0]
    c = EOS(random_state=8).fit_resample(X, y)[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_isolated_class_falls_back_to_its_nearest_enemies():
    rng = np.random.default_rng(1)
    # Class 1 sits far from everything: no member has an enemy among its 3 neighbours.
    X = np.vstack([rng.normal(0, 1, (30, 2)), rng.normal(40, 0.1, (5, 2))])
    y = np.repeat([0, 1], [30, 5])
    sampler = EOS(k_neighbors=3, random_state=0)
    X_res, y_res = sampler.fit_resample(X, y)
    assert sampler.fallback_classes_ == [1]
    assert np.bincount(y_res).tolist() == [30, 30]
    # Partners are among each base's 3 nearest class-0 points.
    enemies = np.flatnonzero(y == 0)
    for b, p in zip(sampler.base_indices_, sampler.partner_indices_):
        d = ((X[enemies] - X[b]) ** 2).sum(1)
        assert p in enemies[np.argsort(d)[:3]]


def test_k_larger_than_a_class_and_than_the_data():
    X, y = blobs()
    for k in (10, 500):  # class 2 has 6 points; the data 81
        X_res, y_res = EOS(k_neighbors=k, random_state=0).fit_resample(X, y)
        assert np.bincount(y_res).tolist() == [60, 60, 60]
        assert np.isfinite(X_res).all()


def test_duplicate_points_never_pair_a_base_with_itself():
    X = np.array([[0.0, 0.0]] * 4 + [[1.0, 1.0]] * 2 + [[0.5, 0.5]])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    sampler = EOS(k_neighbors=2, random_state=0)
    sampler.fit_resample(X, y)
    assert np.all(sampler.base_indices_ != sampler.partner_indices_)


def test_reference_rule_reads_one_rank_nearer_than_the_enemy():
    X, y = blobs()
    k = 5
    sampler = EOS(k_neighbors=k, neighbour_rule="reference-off-by-one", random_state=0)
    X_res, _ = sampler.fit_resample(X, y)
    neighbours = brute_force_neighbours(X, k)
    self_partners = 0
    for b, p in zip(sampler.base_indices_, sampler.partner_indices_):
        ranked = [b, *neighbours[b]]  # the reference's list, the base itself at rank 0
        j = ranked.index(p)
        assert j < k and y[ranked[j + 1]] != y[b]  # the enemy sits one rank further
        self_partners += p == b
    # The defect shows: some new points are copies of their base, and some partners are
    # not enemies at all.
    assert self_partners > 0
    assert np.any(y[sampler.partner_indices_] == y[sampler.base_indices_])


def test_works_inside_an_imbalanced_learn_pipeline():
    X, y = blobs()
    model = make_pipeline(EOS(random_state=0), LogisticRegression(max_iter=500)).fit(X, y)
    assert model.predict(X).shape == y.shape


def test_rejects_bad_parameters():
    X, y = blobs()
    for bad in ({"k_neighbors": 0}, {"max_step": 0.0}, {"max_step": 1.5},
                {"neighbour_rule": "nearest"}):
        with pytest.raises(ValueError):
            EOS(**bad).fit_resample(X, y)


@parametrize_with_checks([EOS(random_state=0)])
def test_imbalanced_learn_estimator_checks(estimator, check):
    check(estimator)


# The exact neighbour search -------------------------------------------------------------------
def sklearn_without_self(X, k, rows=None):
    """scikit-learn's k+1 nearest of each query point with the point itself taken out."""
    rows = np.arange(len(X)) if rows is None else rows
    full = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X[rows], return_distance=False)
    return np.array([[j for j in line if j != i][:k] for i, line in zip(rows, full)])


@pytest.mark.parametrize("n, k", [(90, 4), (1500, 5)])  # one top-k; two-level selection
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_k_nearest_equals_scikit_learn(n, k, dtype):
    X = np.random.default_rng(n).normal(3.0, 1.0, (n, 7)).astype(dtype)
    assert (n >= 4 * expansion.GROUP * k) == (n == 1500)
    assert np.array_equal(k_nearest(X, k), sklearn_without_self(X, k))
    rows = np.array([5, 0, n - 1, 17])
    assert np.array_equal(k_nearest(X, k, rows=rows), sklearn_without_self(X, k, rows))
    assert np.array_equal(k_nearest(X, k, device="cpu"), k_nearest(X, k))


def test_k_nearest_is_the_same_in_small_chunks(monkeypatch):
    X = np.random.default_rng(0).normal(0, 1, (1300, 5))
    whole = k_nearest(X, 6)
    # About 7 query rows per chunk: many chunks, the last one partial.
    monkeypatch.setattr(expansion, "CPU_CHUNK_BYTES", 7 * 1312 * 8)
    assert np.array_equal(k_nearest(X, 6), whole)


def test_k_nearest_with_labels_finds_the_nearest_enemies():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (700, 3))
    y = rng.integers(0, 3, 700).astype(str)  # labels of any type
    rows = np.flatnonzero(y == "1")[:20]
    found = k_nearest(X, 4, rows=rows, labels=y)
    for row, neighbours in zip(rows, found):
        enemies = np.flatnonzero(y != y[row])
        distance = ((X[enemies] - X[row]) ** 2).sum(1)
        assert np.array_equal(neighbours, enemies[np.argsort(distance)[:4]])


def test_k_nearest_skips_the_point_itself_but_not_its_duplicates():
    X = np.array([[0.0, 0.0]] * 3 + [[5.0, 5.0], [0.1, 0.0], [9.0, 9.0]])
    found = k_nearest(X, 3)
    assert all(i not in found[i] for i in range(len(X)))
    for i in range(3):  # the two other copies first (in either order), then the nearest other
        assert set(found[i, :2]) == {0, 1, 2} - {i} and found[i, 2] == 4
    assert set(found[4]) == {0, 1, 2}


def test_write_segments_gives_the_bits_of_the_plain_expression():
    rng = np.random.default_rng(2)
    X = rng.normal(0, 1, (50, 6)).astype(np.float32)
    base, partner = rng.integers(0, 50, 37), rng.integers(0, 50, 37)
    step = rng.uniform(0, 1, 37).astype(np.float32)
    out = np.empty((37, 6), np.float32)
    write_segments(X, base, partner, step, out, rows_per_chunk=5)
    assert np.array_equal(out, X[base] + step[:, None] * (X[partner] - X[base]))


def isolated_large():
    rng = np.random.default_rng(2)
    X = np.vstack([rng.normal(0, 1, (600, 3)), rng.normal(1, 1, (300, 3)),
                   rng.normal(30, 0.5, (40, 3))])
    return X, np.repeat([0, 1, 2], [600, 300, 40])


def wide():
    rng = np.random.default_rng(0)
    counts = [900, 300, 80, 12]
    X = np.vstack([rng.normal(0.8 * c, 1, (m, 6)) for c, m in enumerate(counts)])
    return X.astype(np.float32), np.repeat(np.arange(4), counts)


def isolated():
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(0, 1, (30, 2)), rng.normal(40, 0.1, (5, 2))])
    return X, np.repeat([0, 1], [30, 5])


# Digests of the outputs of the implementation built on scikit-learn's NearestNeighbors
# (before the chunked search): the same neighbour lists give the same bits.
@pytest.mark.parametrize("data, params, digest", [
    (blobs, {"k_neighbors": 5}, "e058006559d8c50d"),
    (blobs, {"neighbour_rule": "reference-off-by-one"}, "97850cfb94421476"),
    (wide, {}, "4c7263ec10ceb1a8"),
    (isolated, {"k_neighbors": 3}, "b6368cc86998b883"),
    (isolated_large, {"k_neighbors": 3}, "f29b4b1ef3a6fcb0"),
])
def test_same_output_as_the_search_through_scikit_learn(data, params, digest):
    X_res, y_res = EOS(random_state=0, **params).fit_resample(*data())
    assert hashlib.sha256(X_res.tobytes() + y_res.tobytes()).hexdigest()[:16] == digest


def test_n_jobs_sets_the_search_threads_only_for_the_call(monkeypatch):
    import torch

    before = torch.get_num_threads()
    seen = []
    original = expansion.k_nearest

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(expansion, "k_nearest", spy)
    EOS(random_state=0, n_jobs=1).fit_resample(*blobs())
    assert seen == [1] and torch.get_num_threads() == before


def test_search_takes_tensors_and_a_device_with_the_same_result():
    import torch

    X, y = wide()
    assert np.array_equal(k_nearest(torch.from_numpy(X), 5), k_nearest(X, 5))
    a = EOS(random_state=0).fit_resample(X, y)[0]
    b = EOS(random_state=0, device="cpu").fit_resample(X, y)[0]
    assert np.array_equal(a, b)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_search_agrees_with_the_cpu_up_to_ties():
    X, y = wide()
    assert np.array_equal(k_nearest(X, 5, device="cuda"), k_nearest(X, 5))
    a = EOS(random_state=0, device="cuda").fit_resample(X, y)
    b = EOS(random_state=0).fit_resample(X, y)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
