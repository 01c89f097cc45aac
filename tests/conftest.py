"""Shared fixtures: an isolated MLflow store per test and a tiny, fast run configuration."""
from __future__ import annotations

import os
import shutil

# On a busy 2-core machine, OpenMP threads that spin while waiting for each other cost more
# than they save; passive waiting keeps the suite's timings steady.  Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def empty_store_template(tmp_path_factory):
    """An MLflow SQLite store with its tables already created (about 2 s to make), copied
    into each test that needs a fresh store."""
    import mlflow

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_store_template):
    """A fresh SQLite tracking store (and artifact folder) under the test's tmp_path."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(empty_store_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working dir
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri("")


@pytest.fixture
def tiny_config():
    """A RunConfig factory for end-to-end tests: digits, 2 + 2 epochs, quiet."""
    from benchmark.config import RunConfig

    def make(**overrides) -> RunConfig:
        # The MLflow model (seconds per run) and system metrics are tested on their own.
        values = dict(dataset="digits", method="eos", epochs=2, head_epochs=2,
                      experiment="tests", log_model=False, system_metrics=False)
        values.update(overrides)
        return RunConfig(**values)

    return make
