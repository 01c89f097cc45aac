"""Exactly-once claims shared by every process that uses one tracking store, however many
machines they run on: a compare-and-set on the params of one MLflow run (the ledger).

MLflow never lets a run's param change value: when two processes log the same param key with
different values, the store's primary key lets exactly one of them win, and the other gets an
error.  So the first process to log ``<name>.<attempt>`` owns that attempt, with no lock
server, no shared file system and nothing beyond the tracking server that every worker talks
to anyway (a PostgreSQL-backed ``mlflow server`` for several machines; a SQLite file on one).

The ledger is one run in the experiment ``benchmark-ledger``; whoever creates that experiment
(its name is unique in the store: that is the one compare-and-set MLflow has before any run
exists) creates the run and names it in the experiment's tag ``ledger_run``.

A driver (a ``grid`` command) registers itself as a tag ``driver.<token>`` on the ledger run
holding its host, process id and start, and a heartbeat; a claim of a driver that ended, or
whose process is gone (on its own host: at once; elsewhere: no heartbeat for
``tracking.STALE_AFTER_SECONDS``), is void, and the next attempt may be claimed.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Callable

from benchmark import tracking
from benchmark.errors import UserError

LEDGER_EXPERIMENT = "benchmark-ledger"
TAG_LEDGER_RUN = "ledger_run"  # experiment tag: the id of the ledger run
DRIVER_PREFIX = "driver."
ENDED = "ended"
# How long a process that lost the race to create the ledger waits for the winner to name its
# run (the winner needs two requests; only a process killed between them makes this wait out).
NAMED_WITHIN_S = 60.0
_ATTEMPT = re.compile(r"^(?P<name>.+)\.(?P<attempt>\d+)$")


def _is_conflict(err: Exception) -> bool:
    """Whether an MLflow error says the param or experiment already holds another value."""
    text = str(err)
    return ("Changing param values is not allowed" in text or "RESOURCE_ALREADY_EXISTS" in text
            or "already exists" in text)


class Ledger:
    """The store's ledger run; ``settle`` is its one operation, ``claim`` the common use."""

    def __init__(self, run_id: str, client):
        self.run_id, self.client = run_id, client
        self.token = uuid.uuid4().hex[:16]
        self._heartbeat: threading.Thread | None = None
        self._stopped = threading.Event()
        self._params: dict[str, str] | None = None
        self._tags: dict[str, str] | None = None
        self._started = time.time()

    # Opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls) -> "Ledger":
        """The store's ledger, created by the first process that asks."""
        mlflow = tracking._mlflow()
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(LEDGER_EXPERIMENT)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(LEDGER_EXPERIMENT)
            except Exception as err:  # noqa: BLE001  (lost the race: the winner names the run)
                if not _is_conflict(err):
                    raise
            else:
                run = client.create_run(experiment_id, run_name="ledger",
                                        tags={tracking.NOTE: cls.description()})
                client.set_terminated(run.info.run_id, "FINISHED")  # never "running"
                client.set_experiment_tag(experiment_id, TAG_LEDGER_RUN, run.info.run_id)
                client.set_experiment_tag(experiment_id, tracking.NOTE, cls.description())
                return cls(run.info.run_id, client)
        deadline = time.monotonic() + NAMED_WITHIN_S
        while True:
            experiment = client.get_experiment_by_name(LEDGER_EXPERIMENT)
            run_id = experiment.tags.get(TAG_LEDGER_RUN) if experiment else None
            if run_id:
                return cls(run_id, client)
            if time.monotonic() > deadline:
                raise UserError(f"the experiment '{LEDGER_EXPERIMENT}' names no ledger run (its "
                                f"creator was killed within a second of making it): delete "
                                f"that experiment for good (mlflow gc) and start again")
            time.sleep(0.5)

    @staticmethod
    def description() -> str:
        return ("Claims of the benchmark's grid drivers (one param per claim; a driver's "
                "liveness in its tag driver.<token>). Kept so that every cell and every "
                "phase 1 runs exactly once however many grid commands share this store; "
                "it holds no results.")

    # Drivers ----------------------------------------------------------------------------------
    def register(self, heartbeat_s: float = tracking.HEARTBEAT_SECONDS) -> None:
        """Record this process as a live driver, and keep its heartbeat until ``close``."""
        self._beat()
        self._heartbeat = threading.Thread(target=self._beat_until_stopped, args=(heartbeat_s,),
                                           name="ledger-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        record = {**tracking.process_tags(), "started": self._started,
                  tracking.TAG_HEARTBEAT: tracking._utc_text(time.time())}
        self.client.set_tag(self.run_id, DRIVER_PREFIX + self.token, json.dumps(record))

    def _beat_until_stopped(self, seconds: float) -> None:
        while not self._stopped.wait(seconds):
            try:
                self._beat()
            except Exception:  # noqa: BLE001  (a missed beat must not stop the grid)
                pass

    def close(self) -> None:
        """This driver has ended: its claims are void from now on."""
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self.client.set_tag(self.run_id, DRIVER_PREFIX + self.token, ENDED)

    def alive(self, token: str) -> bool:
        """Whether the driver ``token`` may still be working on what it claimed (as the
        snapshot tells)."""
        if token == self.token:
            return not self._stopped.is_set()
        if self._tags is None:
            self.refresh()
        text = self._tags.get(DRIVER_PREFIX + token)
        if not text or text == ENDED:
            return False
        record = json.loads(text)
        started_ms = int(record.get("started", 0) * 1000)
        return tracking.dead_reason(record, started_ms, time.time()) is None

    # Claims ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the ledger anew; ``settle`` and ``claim`` work on this snapshot (a stale one
        never wins wrongly: a write to a taken attempt fails, and the ledger is read again)."""
        run = self.client.get_run(self.run_id)
        self._params, self._tags = dict(run.data.params), dict(run.data.tags)

    def attempts(self, name: str) -> list[str]:
        """The values of ``name``'s attempts in the snapshot, oldest first."""
        if self._params is None:
            self.refresh()
        found = {}
        for key, value in self._params.items():
            match = _ATTEMPT.match(key)
            if match and match["name"] == name:
                found[int(match["attempt"])] = value
        return [found[n] for n in sorted(found)]

    def settle(self, name: str, value: str, valid: Callable[[str], bool]) -> str:
        """The value agreed for ``name``: the newest attempt's while ``valid`` holds for it,
        else ``value``, written as the next attempt; when another process writes that attempt
        first, theirs (and so on until one holds)."""
        while True:
            values = self.attempts(name)
            if values and (values[-1] == value or valid(values[-1])):
                return values[-1]
            key = f"{name}.{len(values)}"
            try:
                self.client.log_param(self.run_id, key, value)
            except Exception as err:  # noqa: BLE001
                if not _is_conflict(err):
                    raise
                self.refresh()  # another process took this attempt: look again
                continue
            self._params[key] = value
            return value

    def claim(self, name: str) -> bool:
        """Whether this driver holds ``name`` now (claimed just now or earlier); ``False`` while
        another live driver holds it."""
        return self.settle(name, self.token, self.alive) == self.token

    def holder(self, name: str) -> str | None:
        """The token of the driver that made the newest claim of ``name``, if any."""
        values = self.attempts(name)
        return values[-1] if values else None
