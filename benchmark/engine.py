"""Where a grid's cells and a study's trials run: one after another in this process, or as
tasks of a Ray cluster (started here for ``--jobs N``, or a running one at ``--address``)."""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from benchmark.errors import UserError


def check_cpus(value: float) -> float:
    """CPU threads a task holds: a finite number above 0."""
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"expected a number above 0, got {value!r}")
    return value


def check_gpus(value: float) -> float:
    """GPUs a task holds: a fraction of one, or a whole number of them (Ray's rule)."""
    if not (0 <= value <= 1 or (value > 1 and math.isfinite(value) and value.is_integer())):
        raise UserError(f"expected a fraction in [0, 1] or a whole number of GPUs, got "
                        f"{value!r}")
    return value


@dataclass(frozen=True)
class Resources:
    """What one cell's task holds while it runs: CPU threads and a fraction of a GPU (``None``:
    chosen once the cluster's GPUs are known, see ``RayCluster``)."""

    cpus: float = 1.0
    gpus: float | None = 0.0

    def check(self) -> None:
        try:
            check_cpus(self.cpus)
        except UserError as err:
            raise UserError(f"--cpus-per-task: {err}") from None
        try:
            if self.gpus is not None:
                check_gpus(self.gpus)
        except UserError as err:
            raise UserError(f"--gpus-per-task: {err}") from None


# The drivers this process watches already (a Ray worker runs many tasks of one driver).
_WATCHED: set[str | None] = set()


def die_with(driver: dict[str, str] | None, every_s: float = 1.0) -> None:
    """End this process at once when the driver (its ``tracking.process_tags()``) is gone.

    A Ray cluster started by a driver goes with it, but a task already running finishes its
    cell first, and the driver started again would then run it too.  On the driver's own
    machine the task watches the driver's process; elsewhere Ray ends the tasks of a driver
    that is gone."""
    from benchmark import tracking

    if not driver or driver.get(tracking.TAG_PROCESS_START) in _WATCHED:
        return
    _WATCHED.add(driver.get(tracking.TAG_PROCESS_START))

    def gone() -> bool:
        return tracking.dead_reason(driver, 0, time.time()) is not None \
            and driver.get(tracking.TAG_HOST) == socket.gethostname()

    if gone():
        os._exit(70)

    def watch() -> None:
        while not gone():
            time.sleep(every_s)
        os._exit(70)  # the run stays RUNNING, and is marked KILLED by the next command

    import threading

    threading.Thread(target=watch, name="die-with-driver", daemon=True).start()


def run_cell_task(cfg, tags: dict, threads: int | None,
                  driver: dict[str, str] | None = None) -> dict:
    """One cell, wherever it runs, on ``threads`` CPU threads (``None``: as many as this
    process has), ended with the ``driver`` process (see ``die_with``): its outcome as plain
    data (an exception is described, not raised, so that nothing but text crosses between
    machines)."""
    import torch

    from benchmark.errors import UserError as _UserError
    from benchmark.errors import one_line
    from benchmark.pipeline import run_cell
    from benchmark.studies import failure_reason

    die_with(driver)
    if threads:
        torch.set_num_threads(threads)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    started = time.monotonic()
    try:
        result = run_cell(cfg, progress=False, tags=tags)
    except Exception as err:  # noqa: BLE001  (reported by the driver, which goes on)
        return {"ok": False, "reason": failure_reason(err), "message": one_line(err),
                "user_error": isinstance(err, _UserError), "worker": worker,
                "seconds": time.monotonic() - started}
    return {"ok": True, "run_id": result["run_id"], "metrics": dict(result["metrics"]),
            "phase1_reused": result["phase1_reused"], "worker": worker,
            "seconds": time.monotonic() - started}


class InProcess:
    """Tasks one after another in this process (no engine asked for, or ``--jobs 1``)."""

    slots = 1
    name = "this process"

    def __init__(self) -> None:
        self._queue: list[tuple[int, Any, tuple]] = []
        self._next = 0

    def submit(self, function, *args) -> int:
        self._next += 1
        self._queue.append((self._next, function, args))
        return self._next

    def wait(self, handles: list, timeout: float) -> list[tuple[Any, dict]]:
        """Run the oldest submitted task now and return it as done."""
        if not self._queue:
            return []
        handle, function, args = self._queue.pop(0)
        return [(handle, function(*args))]

    def close(self) -> None:
        pass


class RayCluster:
    """Tasks on Ray, each holding the same ``Resources``; ``slots`` is how many run at once."""

    def __init__(self, jobs: int | None, address: str | None, resources: Resources,
                 env: dict[str, str]):
        try:
            import ray
        except ImportError:
            raise UserError("--jobs and --address run cells on Ray, which is not installed: "
                            "pip install -e '.[cluster]'") from None
        self.ray = ray
        if ray.is_initialized():  # a grid of this process before, or a test
            ray.shutdown()
        runtime_env = {"env_vars": env}
        try:
            if address:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(num_cpus=max(1, int(jobs * resources.cpus)),
                         include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
                         configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            where = f"at {address}" if address else "here"
            hint = ("; a cluster with token authentication (ray start's default) also needs "
                    "RAY_AUTH_MODE=token and its token here (~/.ray/auth_token)"
                    if address and os.environ.get("RAY_AUTH_MODE") != "token" else "")
            raise UserError(f"could not start or reach a Ray cluster {where}: "
                            f"{str(err).splitlines()[0]}{hint}") from None
        cluster = ray.cluster_resources()
        if resources.gpus is None:  # a quarter of a GPU: four trainings share one
            resources = dataclasses.replace(resources, gpus=0.25 if cluster.get("GPU") else 0.0)
        fits = [cluster.get("CPU", 0) / resources.cpus]
        if resources.gpus:
            if not cluster.get("GPU"):
                ray.shutdown()
                raise UserError(f"--gpus-per-cell {resources.gpus}: the Ray cluster has no GPU")
            fits.append(cluster["GPU"] / resources.gpus)
        self.slots = max(1, min(jobs or 10**9, int(min(fits) + 1e-9)))
        self.name = f"Ray ({address or 'local'}: {cluster.get('CPU', 0):g} CPUs, " \
                    f"{cluster.get('GPU', 0):g} GPUs)"
        self.resources = resources
        self._remote: dict[Any, Any] = {}

    def submit(self, function, *args):
        """``function(*args)`` as a task holding ``self.resources`` (``function`` a module-level
        function that returns plain data)."""
        if function not in self._remote:
            self._remote[function] = self.ray.remote(function).options(
                num_cpus=self.resources.cpus, num_gpus=self.resources.gpus, max_retries=0)
        return self._remote[function].remote(*args)

    def wait(self, handles: list, timeout: float) -> list[tuple[Any, dict]]:
        if not handles:
            return []
        done, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            try:
                out.append((ref, self.ray.get(ref)))
            except Exception as err:  # noqa: BLE001  (the worker died: out of memory, say)
                out.append((ref, {"ok": False, "reason": f"{type(err).__name__}: "
                                  f"{str(err).splitlines()[0]}", "message": "",
                                  "user_error": False, "worker": "?", "seconds": 0.0}))
        return out

    def close(self) -> None:
        self.ray.shutdown()


def default_resources(jobs: int | None, address: str | None, cpus: float | None,
                      gpus: float | None) -> Resources:
    """One CPU thread per cell; on a machine with GPUs (``--jobs``), the GPUs shared evenly by
    the cells that run at once; on a cluster, a quarter of a GPU when it has GPUs.  (Sharing
    is free but gains little for a graphed ResNet-32, which alone keeps an H100 busy; it pays
    for cells that stay eager: see README, "Many workers".)"""
    if gpus is None and not address:
        gpus = 0.0
        if jobs:
            try:
                import torch

                count = torch.cuda.device_count()
            except Exception:  # noqa: BLE001
                count = 0
            if count:
                gpus = min(1.0, count / jobs)
    resources = Resources(cpus=1.0 if cpus is None else float(cpus),
                          gpus=None if gpus is None else float(gpus))
    resources.check()
    return resources


def make_engine(jobs: int | None, address: str | None, resources: Resources,
                env: dict[str, str]):
    """The engine a grid runs on: this process when neither ``jobs`` (above 1) nor ``address``
    is given, else Ray."""
    if not address and (jobs is None or jobs <= 1):
        return InProcess()
    return RayCluster(jobs, address, resources, env)
