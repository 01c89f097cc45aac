"""The tracking store under mistakes, kills and concurrency: checked before any work, created
once under a lock, and runs whose process died marked KILLED."""
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import mlflow
import pytest

from benchmark import store, tracking
from benchmark.__main__ import main
from benchmark.errors import UserError


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


# Store check ----------------------------------------------------------------------------------
def test_a_server_that_does_not_answer_ends_the_command_at_once_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "benchmark", "run", "--quiet"], cwd=tmp_path,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == (f"error: MLflow tracking server {uri} does not answer (connection "
                             f"refused); start it or fix MLFLOW_TRACKING_URI\n")
    assert time.monotonic() - started < 30  # MLflow's own retries take over four minutes
    assert list(tmp_path.iterdir()) == []  # no store or artifact folder made on the side


class _NotMlflow(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802  (http.server's naming)
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_a_server_without_the_tracking_api_is_named_as_such():
    server = HTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match="answers but has no MLflow tracking API"):
            store.prepare(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_a_server_that_accepts_but_never_answers_times_out(monkeypatch):
    monkeypatch.setattr(store, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(UserError, match=r"does not answer \(no answer within 0.5 s\)"):
            store.prepare(uri)


def test_http_retries_are_bounded_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    store.bound_http_retries()
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                              MLFLOW_HTTP_REQUEST_TIMEOUT)

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 4
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300


def test_a_store_below_a_file_is_refused(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        store.prepare(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")


def test_an_artifact_root_that_cannot_be_made_is_refused(tmp_path, monkeypatch,
                                                         empty_store_template):
    shutil.copy(empty_store_template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").write_text("not a folder")  # the default artifact root: ./mlruns
    with pytest.raises(UserError, match=r"artifacts of new experiments: .*mlruns is a "
                                        r"file, not a folder; run from a writable folder"):
        store.prepare(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_an_experiment_whose_artifact_folder_cannot_be_made_gets_no_run(mlflow_store,
                                                                       tmp_path):
    (tmp_path / "blocker").write_text("")
    mlflow.create_experiment("elsewhere", artifact_location=str(tmp_path / "blocker" / "art"))
    with pytest.raises(UserError, match="artifacts of experiment 'elsewhere'"):
        with tracking.TrackedRun("elsewhere", "never"):
            pass
    assert _runs() == []


def test_reading_only_needs_an_existing_store(tmp_path):
    with pytest.raises(UserError, match="no tracking store at"):
        store.prepare(f"sqlite:///{tmp_path / 'mlflow.db'}", write=False)
    assert list(tmp_path.iterdir()) == []


def _as_unprivileged() -> list[str]:
    """A command prefix under which file permissions apply (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return []
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run([*drop, "true"]).returncode != 0:
        pytest.skip("running as root without a way to drop the permission override")
    return drop


@pytest.mark.parametrize("case, message", [
    ("read-only store", "is read-only"),
    ("read-only folder", "cannot write the tracking store mlflow.db in"),
])
def test_permission_problems_exit_2_with_one_line(tmp_path, empty_store_template, case,
                                                  message):
    prefix = _as_unprivileged()
    folder = tmp_path / "work"
    folder.mkdir()
    if case == "read-only store":
        shutil.copy(empty_store_template, folder / "mlflow.db")
        (folder / "mlflow.db").chmod(0o444)
    else:
        folder.chmod(0o555)  # the default store ./mlflow.db cannot be created here
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "benchmark", "clean"],
                                cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


# Creation under a lock ------------------------------------------------------------------------
PREPARE = """
import os, sys, time
import mlflow.store.tracking.sqlalchemy_store  # the slow imports first, then start together
from benchmark import tracking
open(sys.argv[1] + "." + sys.argv[2], "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
tracking.prepare_store()
"""


def test_processes_creating_a_new_store_together_all_succeed(tmp_path):
    db, go = tmp_path / "mlflow.db", tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    workers = [subprocess.Popen([sys.executable, "-c", PREPARE, str(go), str(n)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for n in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"go.{n}").exists() for n in range(2)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.01)
    go.touch()
    outcomes = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outcomes
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("after")
    client.set_terminated(client.create_run(experiment).info.run_id)
    assert len(client.search_runs([experiment])) == 1


# Runs whose process died ----------------------------------------------------------------------
VICTIM = """
import time
from benchmark import tracking
with tracking.TrackedRun("killed", "victim") as run:
    print(run.run_id, flush=True)
    time.sleep(300)
"""


def test_a_run_killed_outright_is_marked_killed_by_clean(mlflow_store, capsys):
    victim = subprocess.Popen([sys.executable, "-c", VICTIM], stdout=subprocess.PIPE, text=True)
    try:
        run_id = victim.stdout.readline().strip()
        assert tracking.mark_dead_runs() == ([], 1)  # alive: left alone
    finally:
        victim.kill()
        victim.wait()
    assert mlflow.get_run(run_id).info.status == "RUNNING"

    assert main(["clean"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"marked run {run_id} (victim, experiment 'killed') KILLED: its "
                               f"process {victim.pid} on {socket.gethostname()} is gone")
    assert lines[1] == f"clean: 1 run(s) marked KILLED, 0 still running in {mlflow_store}"
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert "is gone" in run.data.tags[tracking.TAG_FAILURE]
    assert f"process {os.getpid()}" in run.data.tags[tracking.TAG_MARKED_BY]
    assert tracking.mark_dead_runs() == ([], 0)  # once only


def _dead_run(tags: dict[str, str]) -> str:
    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment("crafted").experiment_id
    return client.create_run(experiment, tags=tags, run_name="crafted").info.run_id


def test_the_next_command_marks_a_run_whose_process_id_was_reused(mlflow_store, capsys):
    ticks = tracking.process_tags()[tracking.TAG_PROCESS_START]
    run_id = _dead_run({**tracking.process_tags(), tracking.TAG_PROCESS_START: ticks + "0"})
    mine = _dead_run(tracking.process_tags())  # this very process: alive
    capsys.readouterr()
    marked = tracking.prepare_store()
    assert [run.run_id for run in marked] == [run_id]
    assert "now another process's" in marked[0].reason
    assert capsys.readouterr().err == f"note: {marked[0].describe()}\n"
    assert mlflow.get_run(run_id).info.status == "KILLED"
    assert mlflow.get_run(mine).info.status == "RUNNING"


def _utc(minutes_ago: float) -> str:
    return tracking._utc_text(time.time() - 60 * minutes_ago)


@pytest.mark.parametrize("tags, dead", [
    ({}, False),  # not the suite's run: no process tags, left alone
    ({tracking.TAG_HOST: "elsewhere", tracking.TAG_PID: "1", tracking.TAG_HEARTBEAT: _utc(1)},
     False),
    ({tracking.TAG_HOST: "elsewhere", tracking.TAG_PID: "1", tracking.TAG_HEARTBEAT: _utc(20)},
     True),
    ({tracking.TAG_HOST: "elsewhere", tracking.TAG_PID: "1"}, True),  # started an hour ago
])
def test_other_hosts_runs_are_judged_by_their_heartbeat(tags, dead):
    reason = tracking.dead_reason(tags, int((time.time() - 3600) * 1000), time.time())
    assert (reason is not None) == dead
    if dead:
        assert reason.startswith("no heartbeat from its process 1 on elsewhere since")


def test_an_open_run_keeps_its_heartbeat_fresh_and_stops_it_on_exit(mlflow_store,
                                                                    monkeypatch):
    monkeypatch.setattr(tracking, "HEARTBEAT_SECONDS", 0.05)
    with tracking.TrackedRun("beating", "run") as run:
        mlflow.set_tag(tracking.TAG_HEARTBEAT, "2000-01-01T00:00:00Z")
        deadline = time.monotonic() + 10
        while mlflow.get_run(run.run_id).data.tags[tracking.TAG_HEARTBEAT].startswith("2000"):
            assert time.monotonic() < deadline, "the heartbeat was not refreshed"
            time.sleep(0.05)
        tags = mlflow.get_run(run.run_id).data.tags
        assert tags[tracking.TAG_PID] == str(os.getpid())
        assert tags[tracking.TAG_HOST] == socket.gethostname()
    assert not run._heartbeat._thread.is_alive()
    assert mlflow.get_run(run.run_id).info.status == "FINISHED"


def test_a_failing_heartbeat_is_logged_once_and_never_raised(mlflow_store, monkeypatch,
                                                             caplog):
    monkeypatch.setattr(tracking, "HEARTBEAT_SECONDS", 0.01)
    with caplog.at_level(logging.WARNING, logger="benchmark.tracking"):
        beat = tracking._Heartbeat("0" * 32, mlflow_store)  # no such run: every beat fails
        time.sleep(0.5)
        beat.stop()
    assert not beat._thread.is_alive()
    warnings = [r for r in caplog.records if "heartbeat of run" in r.getMessage()]
    assert len(warnings) == 1
