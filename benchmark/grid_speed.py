"""Benchmark: the wall time of one grid run with ``--jobs`` 1, 2, ... each in a fresh store.

    python -m benchmark.grid_speed                         the smoke grid, --jobs 1 and 2 (CPU)
    python -m benchmark.grid_speed --fake --jobs 1 4 8     8 phase-1 trainings on the fake
                                                           CIFAR-10-LT data sharing one GPU

``--jobs 1`` is the plain sequential grid (no Ray); every other figure includes starting a
local Ray cluster.  Prints each wall time, the cells per minute and the speed-up over the
first.  A benchmark, not a test: the figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_SPEC = """
    # {trainings} independent phase-1 trainings (one per seed) of a ResNet-32 on the fake
    # CIFAR-10-shaped data at the CIFAR-10-LT profile.
    name: fake-scaling
    experiment: fake-scaling
    datasets: [fake]
    losses: [ce]
    methods: [none]
    seeds: {seeds}
    settings: {{epochs: {epochs}, head_epochs: 1, log_model: false, system_metrics: false}}
"""


def time_grid(spec: Path, jobs: int, extra: list[str]) -> tuple[float, str]:
    """Wall seconds of ``grid spec --jobs jobs`` in a fresh SQLite store, and its summary."""
    with tempfile.TemporaryDirectory(prefix="grid-speed-") as folder:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
        command = [sys.executable, "-m", "benchmark", "grid", str(spec), "--quiet", *extra]
        if jobs > 1:
            command += ["--jobs", str(jobs)]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"grid --jobs {jobs} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds, done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.grid_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "studies" / "smoke.yaml"))
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fake", action="store_true",
                        help="time independent phase-1 trainings on the fake dataset instead")
    parser.add_argument("--trainings", type=int, default=8, help="with --fake; default 8")
    parser.add_argument("--epochs", type=int, default=5, help="with --fake; default 5")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    extra = ["--device", args.device]
    with tempfile.TemporaryDirectory(prefix="grid-speed-spec-") as folder:
        spec = Path(args.spec)
        if args.fake:
            spec = Path(folder) / "fake.yaml"
            spec.write_text(textwrap.dedent(FAKE_SPEC.format(
                trainings=args.trainings, seeds=list(range(args.trainings)),
                epochs=args.epochs)))
        print(f"grid {spec.name}, each run in a fresh store; {os.cpu_count()} CPUs here")
        first = None
        for jobs in args.jobs:
            seconds, summary = time_grid(spec, jobs, extra)
            cells = int(summary.split(" cells")[0].rsplit(" ", 1)[-1])
            first = first or seconds
            print(f"--jobs {jobs}: {seconds:7.1f} s wall, {60 * cells / seconds:6.1f} cells/min,"
                  f" speed-up {first / seconds:4.2f}x   [{summary.split(';')[0]}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
