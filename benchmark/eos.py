"""Expansive Over-Sampling (EOS): new minority points on segments toward their nearest enemies.

``EOS`` follows imbalanced-learn's over-sampler API (``fit_resample``, ``sampling_strategy``,
``random_state``), so it drops into an imbalanced-learn pipeline.

How a class c that needs ``m`` new points is over-sampled (``neighbour_rule="nearest-enemy"``,
the default and the method as the paper describes it):

1. Fit K nearest neighbours (Euclidean) over *all* training points; a point's neighbours never
   include the point itself.
2. The eligible bases of c are its members with at least one enemy (a point of another class)
   among their K neighbours.  Draw ``m`` bases uniformly with replacement.
3. For each base pick one of its enemy neighbours uniformly and place the new point at
   ``base + r * (enemy - base)``, ``r ~ U(0, max_step)``; ``max_step = 1`` is the paper's full
   segment.  The new point is labelled c.

Fallback, when no member of c has an enemy among its K neighbours (c sits inside its own
region): every member of c is a base, and its partner is drawn uniformly among its K nearest
enemies, searched over the points of the other classes only.  ``fallback_classes_`` names the
classes for which this happened.  K larger than the data is clamped to what exists.

``neighbour_rule="reference-off-by-one"`` (method ``eos-ref``) reproduces the public
reference code's partner choice on purpose: it draws a rank j among ranks 1..K with
probability proportional to "rank j is an enemy", but reads the neighbour at rank j - 1 (rank
0 being the base itself).  So the partner is the base itself (j = 1, a zero step) or the
point one rank nearer than the chosen enemy, often of the base's own class.  Published EOS
numbers come from that code; the suite keeps it only to replicate them and to show what the
choice changes.  Unlike the reference code it does not crash on classes without an eligible
base (it uses the fallback above) and it keeps every feature column.
"""
from __future__ import annotations

import numbers

import numpy as np
from scipy import sparse
from imblearn.over_sampling.base import BaseOverSampler
from imblearn.utils import check_target_type
from sklearn_compat.utils.validation import validate_data
from sklearn.neighbors import NearestNeighbors
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

NEIGHBOUR_RULES = ("nearest-enemy", "reference-off-by-one")


def neighbours_without_self(X: np.ndarray, k: int, n_jobs: int | None = None) -> np.ndarray:
    """``[n, k]`` indices of each point's k nearest other points (duplicates included)."""
    full = NearestNeighbors(n_neighbors=k + 1, n_jobs=n_jobs).fit(X).kneighbors(
        X, return_distance=False)
    is_self = full == np.arange(len(X))[:, None]
    # Where duplicates push the point itself out of its own k+1 list, drop the farthest.
    is_self[~is_self.any(axis=1), -1] = True
    return full[~is_self].reshape(len(X), k)


def pick_uniform(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Per row, the column of one True entry of ``mask`` drawn uniformly (rows need a True)."""
    keys = np.where(mask, rng.random_sample(mask.shape), -1.0)
    return keys.argmax(axis=1)


class EOS(BaseOverSampler):
    """Expansive Over-Sampling toward nearest enemies (see the module docstring).

    Parameters
    ----------
    sampling_strategy : imbalanced-learn's over-sampling strategy; ``"auto"`` brings every
        class up to the largest.
    random_state : seed or ``RandomState``; the same seed gives the same output.
    k_neighbors : K, the neighbourhood searched for enemies (paper: 10).
    max_step : largest fraction of the way to the partner a new point may go (paper: 1.0).
    neighbour_rule : ``"nearest-enemy"`` or ``"reference-off-by-one"`` (``eos-ref``).
    n_jobs : parallel jobs of the neighbour search.

    Attributes after ``fit_resample``: ``base_indices_``, ``partner_indices_`` and ``steps_``
    describe every synthetic point (row ``len(X) + i`` of the output is
    ``X[base] + step * (X[partner] - X[base])``); ``fallback_classes_`` lists the classes
    over-sampled with the fallback rule.
    """

    _parameter_constraints: dict = {
        **BaseOverSampler._parameter_constraints,
        "k_neighbors": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_step": [Interval(numbers.Real, 0, 1, closed="right")],
        "neighbour_rule": [StrOptions(set(NEIGHBOUR_RULES))],
        "n_jobs": [numbers.Integral, None],
    }

    def __init__(self, *, sampling_strategy="auto", random_state=None, k_neighbors=10,
                 max_step=1.0, neighbour_rule="nearest-enemy", n_jobs=None):
        super().__init__(sampling_strategy=sampling_strategy)
        self.random_state = random_state
        self.k_neighbors = k_neighbors
        self.max_step = max_step
        self.neighbour_rule = neighbour_rule
        self.n_jobs = n_jobs

    def _check_X_y(self, X, y):
        y, binarize_y = check_target_type(y, indicate_one_vs_all=True)
        X, y = validate_data(self, X=X, y=y, reset=True, accept_sparse=["csr", "csc"],
                             dtype=[np.float64, np.float32])
        return X, y, binarize_y

    def _fit_resample(self, X, y):
        if sparse.issparse(X):
            # Sparse input is densified for the neighbour search and returned in its format;
            # embeddings are dense, so this path exists for pipeline compatibility only.
            X_res, y_res = self._fit_resample(X.toarray(), y)
            return sparse.csr_matrix(X_res).asformat(X.format), y_res
        rng = check_random_state(self.random_state)
        y = np.asarray(y)
        n = len(X)
        k = min(self.k_neighbors, n - 1)
        neighbours = neighbours_without_self(X, k, self.n_jobs) if k > 0 else np.empty((n, 0), int)
        enemy = y[neighbours] != y[:, None]

        bases, partners, fallback = [], [], []
        for klass, n_new in self.sampling_strategy_.items():
            if n_new <= 0:
                continue
            members = np.flatnonzero(y == klass)
            eligible = members[enemy[members].any(axis=1)]
            if len(eligible):
                base = rng.choice(eligible, size=n_new, replace=True)
                rank = pick_uniform(enemy[base], rng)
                if self.neighbour_rule == "reference-off-by-one":
                    # Reads rank (rank - 1) of the self-inclusive list: the base itself at 0.
                    partner = np.where(rank == 0, base, neighbours[base, rank - 1])
                else:
                    partner = neighbours[base, rank]
            else:
                base, partner = self._fallback(X, y, klass, members, n_new, rng)
                if base is None:
                    continue
                fallback.append(klass)
            bases.append(base)
            partners.append(partner)

        base = np.concatenate(bases) if bases else np.empty(0, dtype=np.int64)
        partner = np.concatenate(partners) if partners else np.empty(0, dtype=np.int64)
        dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
        step = rng.uniform(0.0, self.max_step, size=len(base)).astype(dtype)
        synthetic = X[base] + step[:, None] * (X[partner] - X[base])
        self.base_indices_, self.partner_indices_, self.steps_ = base, partner, step
        self.fallback_classes_ = fallback
        return np.vstack([X, synthetic]).astype(dtype, copy=False), np.concatenate([y, y[base]])

    def _fallback(self, X, y, klass, members, n_new, rng):
        """Bases = all members of ``klass``; partners among each one's K nearest enemies."""
        enemies = np.flatnonzero(y != klass)
        if len(enemies) == 0:
            return None, None
        k = min(self.k_neighbors, len(enemies))
        near = NearestNeighbors(n_neighbors=k, n_jobs=self.n_jobs).fit(X[enemies])
        nearest_enemies = enemies[near.kneighbors(X[members], return_distance=False)]
        row = rng.randint(0, len(members), size=n_new)
        col = rng.randint(0, k, size=n_new)
        return members[row], nearest_enemies[row, col]
