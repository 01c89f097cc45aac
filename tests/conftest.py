"""Shared fixtures: an isolated MLflow store per test and a tiny, fast run configuration."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store (and artifact folder) under the test's tmp_path."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working dir
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri("")


@pytest.fixture
def tiny_config():
    """A RunConfig factory for end-to-end tests: digits, 2 + 2 epochs, quiet."""
    from benchmark.config import RunConfig

    def make(**overrides) -> RunConfig:
        values = dict(dataset="digits", method="eos", epochs=2, head_epochs=2,
                      experiment="tests")
        values.update(overrides)
        return RunConfig(**values)

    return make
