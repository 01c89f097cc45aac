"""EOS at ImageNet-LT scale: time and peak memory of one ``fit_resample`` against its search bound.

``python -m benchmark.eos_speed`` builds a seeded synthetic set shaped like ImageNet-LT's
training embeddings (1,000 classes of 512-d float32 Gaussian clusters, 1,280 down to 5 points
per class, 115,846 in all; ``--scale`` shrinks the class count and with it everything else),
measures the float32 matrix-product rate of one distance chunk on the device, and prints:

- the bound: the flops of the exact neighbour search's distance products (2 N^2 D) and the
  time they take at that rate (the bare cost of the search, nothing else);
- the wall and CPU time of ``EOS(random_state=seed, device=...).fit_resample(X, y)``, the
  time inside the neighbour searches, and the ratio of the wall time to the bound;
- the peak resident memory during the call (the input, the output and everything the
  process holds, torch included) beside the output's own size.

The matmul rate is measured before and after the call (a shared machine moves it); the faster
gives the bound.  ``--verify ROWS`` then checks the neighbours of that many points against
scikit-learn's brute-force search (ties aside, the lists must match).  Without
imbalanced-learn (the GPU image) it runs ``benchmark.expansion.expand``, the same computation
without imbalanced-learn's input checks, and says so.  Not a test: it takes minutes on 2 CPU
cores at full scale.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch

from benchmark import expansion

IMAGENET_LT = {"classes": 1000, "images": 115_846, "largest": 1280, "smallest": 5, "dim": 512}
MEMORY_LIMIT_BYTES = 4 * 10**9


def long_tail_counts(classes: int) -> list[int]:
    """Points per class for ``classes`` classes along ImageNet-LT's profile: 1,280 down to 5,
    ``1280 * (5 / 1280) ** ((i / (C - 1)) ** p)``, an exponential decay in a power of the
    class rank, with ``p`` such that 1,000 classes hold 115,846 points (a plain exponential
    from 1,280 to 5 would hold twice that: ImageNet-LT's head falls faster)."""
    spec = IMAGENET_LT
    largest, smallest = spec["largest"], spec["smallest"]

    def counts(number: int, power: float) -> np.ndarray:
        rank = np.arange(number) / max(1, number - 1)
        return np.rint(largest * (smallest / largest) ** (rank ** power)).astype(int)

    low, high = 1e-3, 10.0  # the total falls as the power falls
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (low, middle) if counts(spec["classes"], middle).sum() > spec["images"] \
            else (middle, high)
    result = counts(classes, high)
    if classes == spec["classes"]:
        # Rounding leaves a few points over or under: the classes just below the head take
        # them, which keeps the ends of the profile as they are.
        shortfall = spec["images"] - int(result.sum())
        result[1:1 + abs(shortfall)] += int(np.sign(shortfall))
    return sorted(result.tolist(), reverse=True)


def synthetic_embeddings(counts: list[int], dim: int, seed: int, spread: float):
    """Shuffled float32 points: class c is ``N(mean_c, I)`` with ``mean_c ~ N(1, spread^2 I)``
    (an offset from the origin, as pooled ReLU features have), made in chunks (no float64)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    means = 1.0 + spread * rng.standard_normal((len(counts), dim), dtype=np.float32)
    points = np.empty((len(labels), dim), dtype=np.float32)
    for start in range(0, len(labels), 1 << 16):
        part = slice(start, start + (1 << 16))
        rng.standard_normal(points[part].shape, dtype=np.float32, out=points[part])
        points[part] += means[labels[part]]
    return points, labels


def matmul_rate(rows: int, n: int, dim: int, device: torch.device,
                repeats: int = 3) -> tuple[float, float]:
    """Best float32 flops per second of one distance chunk's product ``[rows, D] @ [D, n]``,
    per second of wall time and per second of this process's CPU time."""
    generator = torch.Generator(device=device).manual_seed(0)
    points = torch.randn(n, dim, device=device, generator=generator)
    out = torch.empty(rows, n, device=device)
    wall = cpu = math.inf
    for _ in range(repeats + 1):  # the first one warms up
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.mm(points[:rows], points.T, out=out)
        sync(device)
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    flops = 2 * rows * n * dim
    return flops / wall, flops / max(cpu, 1e-9)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory() -> bool:
    """Restart the kernel's peak-RSS count of this process (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resampler(seed: int, k: int, device: str | None):
    """``(name, fit_resample)``: EOS's, or ``expand`` where imbalanced-learn is missing."""
    try:
        from benchmark.eos import EOS
    except ImportError:
        def fit_resample(points, labels):
            classes, counts = np.unique(labels, return_counts=True)
            n_new = {c: int(counts.max() - n) for c, n in zip(classes.tolist(), counts)}
            made = expansion.expand(points, labels, n_new, k_neighbors=k, max_step=1.0,
                                    neighbour_rule="nearest-enemy",
                                    rng=np.random.RandomState(seed), device=device)
            return made["X"], made["y"], made["fallback"]

        return "expansion.expand (no imbalanced-learn here)", fit_resample
    sampler = EOS(random_state=seed, k_neighbors=k, device=device)

    def fit_resample(points, labels):
        resampled, labels_out = sampler.fit_resample(points, labels)
        return resampled, labels_out, sampler.fallback_classes_

    return "EOS().fit_resample", fit_resample


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def verify(points: np.ndarray, k: int, rows: int, device: str | None) -> dict:
    """The search's neighbours of the first ``rows`` points against a reference: scikit-learn's
    brute-force ``NearestNeighbors`` where it is installed, else this search on the CPU.
    Lists may differ only where distances tie (up to float32 rounding)."""
    query = np.arange(min(rows, len(points)))
    found = expansion.k_nearest(points, k, rows=query, device=device)
    try:
        from sklearn.neighbors import NearestNeighbors
    except ImportError:
        reference, name = expansion.k_nearest(points, k, rows=query), "this search on the CPU"
    else:
        full = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(points).kneighbors(
            points[query], return_distance=False)
        reference = np.array([[j for j in line if j != i][:k] for i, line in zip(query, full)])
        name = "scikit-learn brute force"

    def distances(indices: np.ndarray) -> np.ndarray:
        diff = points[indices].astype(np.float64) - points[query][:, None].astype(np.float64)
        return np.sort((diff * diff).sum(-1), axis=1)

    gap = np.abs(distances(found) - distances(reference)) / distances(reference).clip(1e-12)
    return {"reference": name, "rows": len(query),
            "identical_rows": int((found == reference).all(axis=1).sum()),
            "max_relative_distance_gap": float(gap.max()) if len(query) else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.eos_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="share of ImageNet-LT's 1,000 classes (points follow; cost ~ scale^2)")
    parser.add_argument("--device", default="cpu", help="where the neighbour search runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=10, help="EOS's K")
    parser.add_argument("--spread", type=float, default=0.35,
                        help="spread of the class means (per dimension; the noise is 1)")
    parser.add_argument("--verify", type=int, default=0, metavar="ROWS",
                        help="after the timing, check the neighbours of this many points "
                             "against a reference search")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but PyTorch sees no CUDA device")

    spec = IMAGENET_LT
    classes = max(2, round(spec["classes"] * args.scale))
    counts = long_tail_counts(classes)
    dim = spec["dim"]
    points, labels = synthetic_embeddings(counts, dim, args.seed, args.spread)
    n = len(points)
    rows_out = classes * max(counts)
    out_bytes = rows_out * dim * points.itemsize
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} torch threads")
    print(f"data: {n:,} x {dim} float32 ({points.nbytes:,} bytes), {classes} classes, "
          f"{counts[0]} down to {counts[-1]} per class, seed {args.seed}; search on {where}")
    print(f"output: {rows_out:,} x {dim} float32 = {out_bytes:,} bytes "
          f"({out_bytes / 1e9:.2f} GB, {out_bytes / 2**30:.2f} GiB)")

    group = expansion.GROUP if n >= 4 * expansion.GROUP * args.k else 1
    padded = group * math.ceil(n / group)
    chunk_bytes = expansion.CUDA_CHUNK_BYTES if device.type == "cuda" else expansion.CPU_CHUNK_BYTES
    chunk = max(1, min(n, chunk_bytes // (padded * points.itemsize)))
    rate, cpu_rate = matmul_rate(chunk, n, dim, device)
    flops = 2 * n * n * dim
    print(f"bound: 2 N^2 D = {flops:,} flops ({flops / 1e12:.2f} TFLOP) of distance products; "
          f"float32 matmul [{chunk} x {dim}] @ [{dim} x {n}] at {rate / 1e9:,.1f} GFLOP/s "
          f"-> {flops / rate:.1f} s")

    searched = {"seconds": 0.0, "rows": 0}
    plain_search = expansion.k_nearest

    def timed_search(X, k, **kwargs):
        start = time.perf_counter()
        found = plain_search(X, k, **kwargs)
        searched["seconds"] += time.perf_counter() - start
        searched["rows"] += len(found)
        return found

    what, fit_resample = resampler(args.seed, args.k,
                                   None if device.type == "cpu" else str(device))
    expansion.k_nearest = timed_search
    before = rss_bytes()
    reset = reset_peak_memory()
    wall, cpu = time.perf_counter(), time.process_time()
    resampled, labels_out, fallback = fit_resample(points, labels)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_memory_bytes()
    expansion.k_nearest = plain_search

    # The rate again: on a shared machine it moves; the faster of the two gives the bound.
    rate_after, cpu_rate_after = matmul_rate(chunk, n, dim, device)
    bound = flops / max(rate, rate_after)
    # CPU seconds do not depend on what else the machine runs: the fair bound on a shared one.
    cpu_bound = flops / max(cpu_rate, cpu_rate_after)
    print(f"matmul rate after the call: {rate_after / 1e9:,.1f} GFLOP/s; bound {bound:.1f} s"
          + (f" (CPU time: {max(cpu_rate, cpu_rate_after) / 1e9:,.1f} GFLOP per CPU-second, "
             f"{cpu_bound:.1f} CPU-s)" if device.type == "cpu" else ""))
    balanced = np.bincount(labels_out).tolist() == [max(counts)] * classes
    kept = np.array_equal(resampled[:n], points)
    fallback_rows = searched["rows"] - n
    figures = {
        "what": what, "device": str(device), "where": where, "n": n, "dim": dim,
        "classes": classes, "largest": counts[0], "smallest": counts[-1], "k": args.k,
        "output_rows": len(resampled), "output_bytes": int(resampled.nbytes),
        "bound_flops": flops, "matmul_gflops": rate / 1e9,
        "matmul_gflops_after": rate_after / 1e9, "bound_s": bound,
        "matmul_gflops_per_cpu_s": max(cpu_rate, cpu_rate_after) / 1e9, "cpu_bound_s": cpu_bound,
        "wall_s": wall, "cpu_s": cpu, "search_s": searched["seconds"],
        "fallback_classes": len(fallback), "fallback_search_rows": fallback_rows,
        "ratio_to_bound": wall / bound, "cpu_ratio_to_cpu_bound": cpu / cpu_bound,
        "peak_rss_bytes": peak, "rss_before_call_bytes": before,
        "peak_since_start_of_call": reset, "balanced": balanced, "input_rows_kept": kept}
    print(f"{what}: {wall:.1f} s wall, {cpu:.1f} s CPU, of which neighbour searches "
          f"{searched['seconds']:.1f} s ({len(fallback)} fallback classes, "
          f"{fallback_rows:,} extra query rows)")
    target = "target <= 1.5x on 2 CPU cores" if device.type == "cpu" else "target: under 10 s"
    cpu_ratio = f"; CPU time to CPU bound: {cpu / cpu_bound:.2f}x" if device.type == "cpu" else ""
    print(f"ratio to bound: {wall / bound:.2f}x ({target}){cpu_ratio}; peak RSS "
          f"{'during the call' if reset else 'of the process'}: {peak:,} bytes "
          f"({peak / 1e9:.2f} GB; limit 4 GB: {'ok' if peak <= MEMORY_LIMIT_BYTES else 'OVER'}; "
          f"{before / 1e9:.2f} GB held before the call: input, libraries)")
    print(f"checks: balanced {balanced}, input rows kept {kept}, output "
          f"{resampled.shape[0]:,} x {resampled.shape[1]} {resampled.dtype}")
    ok = balanced and kept
    del resampled, labels_out
    if args.verify:
        figures["verify"] = check = verify(points, args.k, args.verify,
                                           None if device.type == "cpu" else str(device))
        # Ties aside, the lists match; a distance gap beyond float32 rounding is a wrong answer.
        ok = ok and check["max_relative_distance_gap"] < 1e-4
        print(f"neighbours of {check['rows']:,} points against {check['reference']}: "
              f"{check['identical_rows']:,} lists identical, largest relative distance gap "
              f"{check['max_relative_distance_gap']:.1e} (ties only if below 1e-4)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
