"""The store's ledger: compare-and-set claims that void with their driver (on SQLite here;
tests/test_cluster.py runs it on PostgreSQL behind an mlflow server)."""
import json
import subprocess
import sys

import mlflow

from benchmark import tracking
from benchmark.ledger import DRIVER_PREFIX, LEDGER_EXPERIMENT, Ledger


def test_one_ledger_per_store_and_a_claim_is_held_by_one_live_driver(mlflow_store):
    first, second = Ledger.open(), Ledger.open()
    assert first.run_id == second.run_id
    assert mlflow.get_run(first.run_id).info.status == "FINISHED"  # never shown as running
    first.register(), second.register()
    assert first.claim("cell.a") and first.claim("cell.a")  # claimed, and still held
    second.refresh()
    assert not second.claim("cell.a") and second.holder("cell.a") == first.token
    assert second.claim("cell.b")
    first.refresh()
    assert not first.claim("cell.b")
    # A driver that ends voids its claims: the next attempt goes to whoever asks.
    first.close()
    second.refresh()
    assert second.claim("cell.a") and second.attempts("cell.a") == [first.token, second.token]
    second.close()


def test_a_stale_snapshot_never_wins_a_taken_attempt(mlflow_store):
    first, second = Ledger.open(), Ledger.open()
    first.register(), second.register()
    second.refresh()  # sees no claim of "x" yet
    assert first.claim("x")
    assert not second.claim("x")  # its write of attempt 0 fails; it reads the ledger again
    assert second.holder("x") == first.token
    first.close(), second.close()


def test_the_claims_of_a_killed_driver_are_void_at_once_on_its_host(mlflow_store):
    code = ("from benchmark.ledger import Ledger; import os, signal; l = Ledger.open(); "
            "l.register(); assert l.claim('cell.k'); print(l.token, flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    token = killed.stdout.strip()
    assert killed.returncode == -9 and token
    ledger = Ledger.open()
    record = json.loads(mlflow.get_run(ledger.run_id).data.tags[DRIVER_PREFIX + token])
    assert record[tracking.TAG_PID] and record[tracking.TAG_HEARTBEAT]
    assert not ledger.alive(token)
    ledger.register()
    assert ledger.claim("cell.k") and ledger.attempts("cell.k") == [token, ledger.token]
    ledger.close()
    assert mlflow.get_experiment_by_name(LEDGER_EXPERIMENT) is not None
