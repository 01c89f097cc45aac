"""Grids and studies on several workers, on the real stack: PostgreSQL, an mlflow server on it
serving the artifacts, Ray; every cell and every phase 1 exactly once."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ray = pytest.importorskip("ray", reason="the cluster extra is not installed: "
                                        "pip install -e '.[cluster]'")
psycopg = pytest.importorskip("psycopg", reason="the cluster extra is not installed")

# The smoke grid's cells (2 losses x 3 methods x 2 seeds = 12 cells, 4 phase-1 keys), trained
# for a few epochs so that the tests take seconds per cell.
SMOKE = """
    name: smoke
    experiment: %(experiment)s
    datasets: [digits]
    losses: [ce, focal]
    methods: [none, smote, eos]
    backbones: [resnet32]
    seeds: [0, 1]
    settings: {epochs: 1, head_epochs: 1, subset_seed: %(subset_seed)d, log_model: false,
               system_metrics: false}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    path = found[-1] if found else shutil.which("pg_ctl")
    return Path(path).parent if path else None


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of its own on 127.0.0.1 for the session; its URL without a
    database.  As root, the server runs as the user ``postgres`` (it refuses root)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server is not installed (.ci/run installs Debian's postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="benchmark-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    subprocess.run([*as_user, bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                          f"-c max_connections=200", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _database(postgres: str) -> str:
    """A new, empty database on the server; its URL."""
    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{postgres}/{name}"


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """An ``mlflow server`` on a fresh PostgreSQL database, serving the artifacts itself (the
    workers need no shared file system), bound to 127.0.0.1; shared by this module's tests,
    each in experiments and with phase-1 keys of its own."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", _database(postgres),
         "--serve-artifacts", "--artifacts-destination", str(folder / "served-artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.fail(f"mlflow server did not start: "
                        f"{(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def tracking_server(server, tmp_path, monkeypatch):
    """The test logs to the module's server."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(server)
    yield server
    mlflow.set_tracking_uri("")


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmark", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cells(experiment: str) -> list:
    import mlflow

    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string="tags.grid_role = 'cell'")
    return runs


def _finished_cells_and_phase1(experiment: str) -> tuple[list[str], int]:
    """The cell keys of the finished cell runs (one entry per run), and how many runs trained
    a phase 1 to its end."""
    cells = _cells(experiment)
    finished = [r.data.tags["cell_key"] for r in cells if r.info.status == "FINISHED"]
    trained = sum(r.data.tags.get("phase1_complete") == "true" for r in cells)
    return finished, trained


def test_grid_on_two_jobs_is_killed_and_restarted_and_runs_every_cell_once(tracking_server,
                                                                           tmp_path):
    spec = tmp_path / "smoke.yaml"
    spec.write_text(textwrap.dedent(SMOKE % {"experiment": "smoke-killed", "subset_seed": 0}))
    command = _command("grid", str(spec), "--jobs", "2", "--quiet")
    driver = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(_finished_cells_and_phase1("smoke-killed")[0]) < 3:
        assert driver.poll() is None, driver.stdout.read()
        assert time.monotonic() < deadline, "no three cells finished in 5 minutes"
        time.sleep(1)
    driver.send_signal(signal.SIGKILL)  # the driver alone: Ray's processes share its fate
    driver.wait()
    finished_at_kill = len(_finished_cells_and_phase1("smoke-killed")[0])
    assert finished_at_kill < 12

    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    finished, trained = _finished_cells_and_phase1("smoke-killed")
    assert len(finished) == 12 and len(set(finished)) == 12  # each cell once
    assert trained == 4  # each phase 1 once
    # The restart ran only what was missing, one line per cell: cell, worker, BAC, seconds.
    summary = again.stdout.strip().splitlines()[-1]
    earlier = int(summary.split(" already finished")[0].rsplit(", ", 1)[1])
    ran_now = int(summary.split(" ran ok now")[0].rsplit(", ", 1)[1])
    assert earlier >= finished_at_kill and earlier + ran_now == 12, summary
    lines = [line for line in again.stdout.splitlines() if " BAC " in line]
    assert len(lines) == ran_now
    assert all(" s, run " in line and ":" in line.split("(")[-1] for line in lines), lines
    import mlflow

    parents = mlflow.search_runs(experiment_names=["smoke-killed"], output_format="list",
                                 filter_string="tags.grid_role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # The artifacts went through the server: a cell's model-free artifacts are readable here.
    any_cell = _cells("smoke-killed")[0]
    assert mlflow.MlflowClient().list_artifacts(any_cell.info.run_id)


def test_two_grid_commands_on_one_spec_run_each_cell_and_phase1_once(tracking_server, tmp_path):
    spec = tmp_path / "smoke.yaml"
    spec.write_text(textwrap.dedent(SMOKE % {"experiment": "smoke-two", "subset_seed": 1}))
    command = _command("grid", str(spec), "--quiet")
    drivers = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [driver.communicate(timeout=600)[0] for driver in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outputs
    finished, trained = _finished_cells_and_phase1("smoke-two")
    assert len(finished) == 12 and len(set(finished)) == 12
    assert trained == 4
    # Both drivers did some of the work, and neither claims the other's cells as its own.
    ran = [int(out.split(" ran ok now")[0].rsplit(", ", 1)[1]) for out in outputs]
    assert sum(ran) == 12 and min(ran) > 0, outputs
    import mlflow

    parents = mlflow.search_runs(experiment_names=["smoke-two"], output_format="list",
                                 filter_string="tags.grid_role = 'parent'")
    assert len(parents) == 1


def test_study_on_two_jobs_with_postgresql_storage_is_exact(tracking_server, postgres,
                                                            tmp_path):
    import mlflow
    import optuna
    import yaml

    from benchmark import studies

    storage = _database(postgres)
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({
        "study": "k-on-ray", "experiment": "ray-tuning", "trials": 6,
        "cell": {"dataset": "digits", "method": "eos", "epochs": 1, "head_epochs": 1,
                 "subset_seed": 2, "log_model": False, "system_metrics": False},
        "search_space": {"k_neighbors": {"type": "int", "low": 3, "high": 30}},
        "sampler": {"name": "TPESampler", "seed": 0}, "pruner": {"name": "NopPruner"}}))
    result = subprocess.run(_command("tune", str(spec), "--storage", storage, "--jobs", "2",
                                     "--quiet"), env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="k-on-ray", storage=studies.make_storage(storage))
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert optuna.trial.TrialState.RUNNING not in states
    runs = mlflow.search_runs(experiment_names=["ray-tuning"], output_format="list")
    assert sum(r.data.tags.get("phase1_complete") == "true" for r in runs) == 1
    assert len([r for r in runs if r.data.tags.get("study_role") == "final"]) == 1
    assert len([r for r in runs if r.data.tags.get("study_role") == "study"]) == 1
    # Two processes ran trials (two workers' process ids among the trial runs).
    workers = {r.data.tags.get("process_id") for r in runs
               if r.data.tags.get("study_role") == "trial"}
    assert len(workers) == 2
