"""Pixel over-sampling benchmark: time and peak memory of ``resample_images`` per sampler.

``python -m benchmark.pixel_speed`` builds a CIFAR-10-LT-shaped training set (ratio 100:
12,406 random uint8 32x32 RGB images, counts 5000 ... 50, fixed seed) and over-samples it with
SMOTE (k 5), Borderline-SMOTE, SVM-SMOTE (imbalanced-learn defaults; ``svmsmote-once`` with
``baselines.pixel.FitOnceSVC``, the same output) and EOS (k 10), each in a
fresh subprocess so that one sampler's memory does not count against the next.  Per sampler it
prints wall time and CPU time (``time.process_time``: all threads of the worker) of the
``resample_images`` call alone, peak RSS of the worker (``getrusage`` ``ru_maxrss``: the high
water mark over its whole life, imports and data included) and its RSS just before the call,
and the size of the output.  A worker still running after ``--timeout`` seconds is stopped; its
row then shows the time it ran, its CPU time (``/proc/<pid>/stat``, imports and data included)
and its peak RSS (``/proc/<pid>/status`` VmHWM) just before it was stopped.  The pixels are random (``--data noise``, the default, or overlapping
class clusters, ``--data clustered``): the figures measure cost, not image quality.
``--scale`` shrinks every class for a quick try.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

CIFAR10_LT_COUNTS = (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)
SAMPLERS = ("smote", "bsmote", "svmsmote", "svmsmote-once", "eos")
RESULT_PREFIX = "RESULT "
MIB = 1024 * 1024


def make_sampler(name: str, seed: int):
    from imblearn.over_sampling import SMOTE, SVMSMOTE, BorderlineSMOTE

    from baselines.pixel import FitOnceSVC
    from benchmark.eos import EOS

    return {"smote": lambda: SMOTE(k_neighbors=5, random_state=seed),
            "bsmote": lambda: BorderlineSMOTE(random_state=seed),
            "svmsmote": lambda: SVMSMOTE(random_state=seed),
            "svmsmote-once": lambda: SVMSMOTE(
                random_state=seed, svm_estimator=FitOnceSVC(gamma="scale", random_state=seed)),
            "eos": lambda: EOS(k_neighbors=10, random_state=seed)}[name]()


def long_tailed_images(scale: float, seed: int,
                       data: str = "noise") -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 [N, 3, 32, 32] images with the CIFAR-10-LT counts times ``scale``.

    ``noise``: every pixel uniform in [0, 255], no class structure.  ``clustered``: a random
    mean image per class (per pixel 128 + N(0, 8)) plus N(0, 50) noise per pixel, rounded and
    clipped: classes overlap, so head classes are mostly their own nearest neighbours and tail
    classes mostly not, roughly as in real pixel space.
    """
    # Six per class at least: SMOTE's 5 neighbours need six members.
    counts = [max(6, round(count * scale)) for count in CIFAR10_LT_COUNTS]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    shape = (sum(counts), 3, 32, 32)
    if data == "noise":
        images = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        means = (128 + rng.normal(0, 8, (len(counts),) + shape[1:])).astype(np.float32)
        images = np.empty(shape, dtype=np.uint8)
        for start in range(0, len(labels), 1024):  # float32 blocks, not one float64 array
            block = means[labels[start:start + 1024]] + rng.standard_normal(
                (len(labels[start:start + 1024]),) + shape[1:], dtype=np.float32) * 50
            images[start:start + len(block)] = np.clip(np.rint(block), 0, 255)
    return torch.from_numpy(images), torch.from_numpy(labels)


def rss_now_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a running process so far, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a running process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measure_one(name: str, scale: float, seed: int, data: str) -> dict:
    """Runs in the worker: one sampler, one call, its figures."""
    from baselines.pixel import resample_images

    images, labels = long_tailed_images(scale, seed, data)
    sampler = make_sampler(name, seed)
    rss_before = rss_now_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    out_images, out_labels = resample_images(images, labels, sampler)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"sampler": name, "status": "ok", "wall_s": wall, "cpu_s": cpu,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mib": rss_before, "images_in": len(images),
            "images_out": len(out_images), "synthetic": len(out_images) - len(images),
            "output_mib": out_images.numel() / MIB}


def run_worker(name: str, scale: float, seed: int, data: str, timeout: float) -> dict:
    """One sampler in a fresh interpreter, stopped after ``timeout`` seconds."""
    command = [sys.executable, "-m", "benchmark.pixel_speed", "--worker", name,
               "--scale", str(scale), "--seed", str(seed), "--data", data]
    started = time.perf_counter()
    # Files, not pipes: a worker never blocks on output that is read only at its end.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        worker = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        peak = None
        while worker.poll() is None:
            peak = peak_rss_mib(worker.pid) or peak
            if time.perf_counter() - started > timeout:
                cpu = cpu_seconds(worker.pid)
                worker.kill()
                worker.wait()
                return {"sampler": name, "status": f"stopped after {timeout:.0f} s",
                        "wall_s": time.perf_counter() - started, "cpu_s": cpu,
                        "peak_rss_mib": peak}
            time.sleep(0.5)
        stdout.seek(0)
        stderr.seek(0)
        for line in stdout.read().splitlines():
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        errors = stderr.read().strip().splitlines()
    return {"sampler": name, "status": f"failed (exit {worker.returncode})",
            "wall_s": time.perf_counter() - started, "peak_rss_mib": peak,
            "error": errors[-1] if errors else ""}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the CIFAR-10-LT class counts (default 1: 12,406 images)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS),
                        help=f"comma-separated subset of {','.join(SAMPLERS)}")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds after which a sampler is stopped (default 900)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("noise", "clustered"), default="noise",
                        help="uniform noise, or overlapping per-class clusters (see "
                             "long_tailed_images); SVM-SMOTE refuses pure noise")
    parser.add_argument("--worker", choices=SAMPLERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(measure_one(args.worker, args.scale, args.seed,
                                                       args.data)),
              flush=True)
        return
    names = [name.strip() for name in args.samplers.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SAMPLERS))
    if unknown:
        parser.error(f"unknown sampler(s) {unknown}; choose from {list(SAMPLERS)}")
    images, _ = long_tailed_images(args.scale, args.seed, args.data)
    print(f"{len(images)} random 3x32x32 uint8 images ({args.data}), CIFAR-10-LT counts x "
          f"{args.scale}, seed {args.seed}; {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    header = (f"{'sampler':<13} {'status':<18} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13} "
              f"{'RSS before':>11} {'images out':>11} {'synthetic':>10} {'out MiB':>8}")
    print(header, flush=True)
    for name in names:
        row = run_worker(name, args.scale, args.seed, args.data, args.timeout)
        print(f"{row['sampler']:<13} {row['status']:<18} {fmt(row.get('wall_s'), '8.1f')} "
              f"{fmt(row.get('cpu_s'), '8.1f')} {fmt(row.get('peak_rss_mib'), '13.0f')} "
              f"{fmt(row.get('rss_before_mib'), '11.0f')} {fmt(row.get('images_out'), '11d')} "
              f"{fmt(row.get('synthetic'), '10d')} {fmt(row.get('output_mib'), '8.0f')}",
              flush=True)
        if row.get("error"):
            print(f"    {row['sampler']}: {row['error']}", flush=True)


if __name__ == "__main__":
    main()
