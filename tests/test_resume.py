"""A phase 1 killed with SIGKILL resumes from its checkpoint, bit-identical to an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import torch

from benchmark import pipeline, tracking
from benchmark.pipeline import run_cell

EPOCHS = 14


def phase1_state(run_id):
    folder = tracking.download_artifacts(run_id, "phase1")
    return torch.load(folder / "model.pt", weights_only=True)


def wait_for_checkpoint(process, min_epoch, timeout=120):
    """The id of the subprocess's run once it has checkpointed ``min_epoch`` epochs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        for run in runs:
            if int(run.data.tags.get(tracking.TAG_CHECKPOINT_EPOCH, 0)) >= min_epoch:
                return run.info.run_id
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


def test_killed_phase1_resumes_bit_identical(mlflow_store, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHECKPOINT_SECONDS", 0.0)
    config = tiny_config(method="none", epochs=EPOCHS, head_epochs=1, experiment="resume")
    reference = run_cell(config, reuse_phase1=False, progress=False)
    reference_state = phase1_state(reference["run_id"])
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
        mlflow.MlflowClient().delete_run(run.info.run_id)  # the store forgets the reference

    env = {**os.environ, "BENCHMARK_CHECKPOINT_SECONDS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmark", "run", "--method", "none", "--dataset", "digits",
         "--epochs", str(EPOCHS), "--head-epochs", "1", "--experiment", "resume", "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed = wait_for_checkpoint(process, min_epoch=3)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert mlflow.get_run(killed).info.status == "RUNNING"  # kill -9 ends nothing by itself
    marked, _ = tracking.mark_dead_runs()  # as the next command on the store does first
    assert killed in {dead.run_id for dead in marked}
    assert mlflow.get_run(killed).info.status == "KILLED"

    resumed = run_cell(config, progress=False)
    assert resumed["resumed_from"] == killed and not resumed["phase1_reused"]
    run = mlflow.get_run(resumed["run_id"])
    assert int(run.data.tags["resumed_at_epoch"]) >= 3
    for name, value in reference["metrics"].items():
        if not name.startswith("time/"):
            assert resumed["metrics"][name] == value, name
    state = phase1_state(resumed["run_id"])
    assert state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert torch.equal(state[name], tensor), name
    # The resumed run's curves cover every epoch, those before the kill included.
    history = mlflow.MlflowClient().get_metric_history(resumed["run_id"], "phase1/val_bac")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
