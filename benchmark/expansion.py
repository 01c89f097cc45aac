"""EOS's computation without imbalanced-learn: exact nearest neighbours in chunks, new points.

``benchmark.eos.EOS`` wraps ``expand`` in imbalanced-learn's sampler API; this module needs only
NumPy and torch, so a machine without imbalanced-learn (the GPU image) runs the same code.

The neighbour search is exact and runs through torch on the CPU or on a CUDA device: squared
distances of a chunk of query rows to every point by one matrix product
(``|y|^2 - 2 x.y``, the query's own ``|x|^2`` being the same along its row), in the data's
float type after centring the data (which keeps the products' cancellation small), then the k
smallest per row.  The k smallest come from a two-level selection: the row's n columns are
dealt into W = n / ``GROUP`` interleaved groups of ``GROUP`` columns (column j in group
j mod W), the k groups with the smallest minima are kept, and the k smallest among their
members are the k smallest of the row (every point nearer than the k-th lies in a group whose
minimum is at most its distance, so at most k - 1 groups rank before its own).  That turns a
full top-k over every distance into one elementwise minimum pass, as cheap as reading the
chunk once, and a top-k over W minima.

The new rows go straight into one preallocated output, in chunks, computed where the search
ran (torch's CPU threads, or the GPU with each chunk copied back), with the float operations of
``X[base] + step * (X[partner] - X[base])``: the same bits as that expression.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Query rows per chunk: enough that the distance block of one chunk holds about this many bytes
# (on the CPU, larger products spread the packing of the points better: 1,158 rows at 115,846
# points do 141 GFLOP per CPU-second here, 289 rows 120).
CPU_CHUNK_BYTES = 2**29
CUDA_CHUNK_BYTES = 2**30
# Columns per group of the two-level selection.
GROUP = 32


def k_nearest(X, k: int, *, rows=None, labels=None, device=None) -> np.ndarray:
    """Indices ``[len(rows), k]`` into ``X`` of the k nearest points (Euclidean) to each point
    ``X[rows]`` (default: every point), nearest first.

    A point is never its own neighbour, but its duplicates are (at distance 0).  With
    ``labels``, points that share the query's label are left out too: the result is the
    query's k nearest enemies.  ``k`` must not exceed the points left.  ``device`` is where
    the search runs (``None``: where ``X`` is, the CPU for a NumPy array; ``"cuda"``; any
    torch device); ``X`` may be a NumPy array or a torch tensor, on any device.

    Exact up to ties: distances that are equal, or equal up to the rounding of ``X``'s float
    type (float32 stays float32), may come in either order, as they may in scikit-learn's
    ``NearestNeighbors``.
    """
    points = as_points(X, device)
    device = points.device
    with torch.no_grad():
        points = points - points.mean(0)  # the copy the search works on
        n = len(points)
        squared = torch.cat([(part * part).sum(1) for part in points.split(65536)])
        queries = (torch.arange(n, device=device) if rows is None
                   else torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device))
        label_of = None if labels is None else torch.as_tensor(
            np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1), device=device)
        group = GROUP if n >= 4 * GROUP * k else 1
        width = math.ceil(n / group)  # slots per group; the padded columns stay +inf
        chunk_bytes = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
        chunk = max(1, min(len(queries), chunk_bytes // (group * width * points.element_size())))
        block = torch.full((chunk, group * width), math.inf, dtype=points.dtype, device=device)
        slots = width * torch.arange(group, device=device)
        found = torch.empty((len(queries), k), dtype=torch.int64, device=device)
        for start in range(0, len(queries), chunk):
            query = queries[start:start + chunk]
            b = len(query)
            padded = block[:b]
            distance = padded[:, :n]
            torch.addmm(squared.expand(b, n), points[query], points.T, beta=1, alpha=-2,
                        out=distance)
            distance[torch.arange(b, device=device), query] = math.inf
            if label_of is not None:
                distance.masked_fill_(label_of[None, :] == label_of[query][:, None], math.inf)
            if group == 1:
                found[start:start + b] = distance.topk(k, largest=False, sorted=True).indices
                continue
            minima = padded.view(b, group, width).amin(1)
            best = minima.topk(k, largest=False, sorted=False).indices
            columns = (best[:, :, None] + slots).reshape(b, -1)
            nearest = padded.gather(1, columns).topk(k, largest=False, sorted=True).indices
            found[start:start + b] = columns.gather(1, nearest)
        return found.cpu().numpy()


def as_points(X, device=None) -> torch.Tensor:
    """``X`` as a torch tensor on ``device`` (default: where it is), without a copy where it
    already is one there (a NumPy array on the CPU shares its memory)."""
    points = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X))
    return points.to(device) if device is not None else points


def pick_uniform(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Per row, the column of one True entry of ``mask`` drawn uniformly (rows need a True)."""
    keys = np.where(mask, rng.random_sample(mask.shape), -1.0)
    return keys.argmax(axis=1)


def expand(X: np.ndarray, y: np.ndarray, n_new: dict, *, k_neighbors: int, max_step: float,
           neighbour_rule: str, rng: np.random.RandomState, device=None) -> dict:
    """EOS over dense ``X`` (float) and labels ``y``: ``n_new[c]`` new points for class c,
    by the rules of ``benchmark.eos`` (its docstring), drawing from ``rng`` in the order the
    classes come in ``n_new``.  ``device`` is where the neighbour search and the new rows'
    arithmetic run (``None``: the CPU).  Returns ``{"X", "y", "base", "partner", "step",
    "fallback"}``: the resampled NumPy arrays (``X`` first, then the new rows), and what made
    each new point."""
    n = len(X)
    k = min(k_neighbors, n - 1)
    source = as_points(X, device)  # on the CPU, X itself
    neighbours = k_nearest(source, k) if k > 0 else np.empty((n, 0), np.int64)
    enemy = y[neighbours] != y[:, None]

    wanted = [(klass, count) for klass, count in n_new.items() if count > 0]
    members = {klass: np.flatnonzero(y == klass) for klass, _ in wanted}
    eligible = {klass: members[klass][enemy[members[klass]].any(axis=1)] for klass, _ in wanted}
    nearest_enemies = fallback_partners(
        source, y, [klass for klass, _ in wanted if not len(eligible[klass])], members,
        k_neighbors)

    bases, partners, fallback = [], [], []
    for klass, count in wanted:
        if len(eligible[klass]):
            base = rng.choice(eligible[klass], size=count, replace=True)
            rank = pick_uniform(enemy[base], rng)
            if neighbour_rule == "reference-off-by-one":
                # Reads rank (rank - 1) of the self-inclusive list: the base itself at 0.
                partner = np.where(rank == 0, base, neighbours[base, rank - 1])
            else:
                partner = neighbours[base, rank]
        else:
            if klass not in nearest_enemies:  # no point of another class exists
                continue
            candidates = nearest_enemies[klass]
            row = rng.randint(0, len(members[klass]), size=count)
            col = rng.randint(0, candidates.shape[1], size=count)
            base, partner = members[klass][row], candidates[row, col]
            fallback.append(klass)
        bases.append(base)
        partners.append(partner)

    base = np.concatenate(bases) if bases else np.empty(0, dtype=np.int64)
    partner = np.concatenate(partners) if partners else np.empty(0, dtype=np.int64)
    step = rng.uniform(0.0, max_step, size=len(base)).astype(X.dtype)
    resampled = np.empty((n + len(base), X.shape[1]), dtype=X.dtype)
    resampled[:n] = X
    write_segments(source, base, partner, step, resampled[n:])
    return {"X": resampled, "y": np.concatenate([y, y[base]]), "base": base,
            "partner": partner, "step": step, "fallback": fallback}


def fallback_partners(X, y, classes: list, members: dict, k_neighbors: int) -> dict:
    """``{class: [len(members), k]}`` each member's k nearest enemies, k = min(K, enemies),
    for every class of ``classes`` that has an enemy; one search per distinct k."""
    by_k: dict[int, list] = {}
    for klass in classes:
        enemies = len(y) - len(members[klass])
        if enemies:
            by_k.setdefault(min(k_neighbors, enemies), []).append(klass)
    found = {}
    for k, group in by_k.items():
        rows = np.concatenate([members[klass] for klass in group])
        nearest = k_nearest(X, k, rows=rows, labels=y)
        for klass, part in zip(group, np.split(nearest, np.cumsum(
                [len(members[klass]) for klass in group])[:-1])):
            found[klass] = part
    return found


def write_segments(X, base: np.ndarray, partner: np.ndarray, step: np.ndarray,
                   out: np.ndarray, rows_per_chunk: int | None = None) -> None:
    """``out[i] = X[base[i]] + step[i] * (X[partner[i]] - X[base[i]])`` in chunks, with the
    same float operations (so the same bits) as that NumPy expression, without its full-size
    temporaries.  ``X`` (an array or a tensor) says where the arithmetic runs: on the CPU in
    torch's threads straight into ``out``, on a GPU chunk by chunk, copied into ``out``."""
    source = as_points(X)
    on_host = source.device.type == "cpu"
    rows_per_chunk = rows_per_chunk or (1 << 14 if on_host else 1 << 17)
    steps = torch.from_numpy(np.ascontiguousarray(step)).to(source.device)
    with torch.no_grad():
        for start in range(0, len(base), rows_per_chunk):
            part = slice(start, start + rows_per_chunk)
            target = torch.from_numpy(out[part])
            origin = source[torch.as_tensor(base[part], device=source.device)]
            rows = torch.as_tensor(partner[part], device=source.device)
            result = torch.index_select(source, 0, rows, out=target) if on_host \
                else source[rows]
            result.sub_(origin).mul_(steps[part, None]).add_(origin)
            if not on_host:
                target.copy_(result)
