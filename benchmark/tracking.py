"""The only module that talks to MLflow: runs, their end states, artifacts and the stage cache."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmark import __version__
from benchmark.errors import RunStopped

# Tag names the suite writes and reads.
TAG_PHASE1_KEY = "phase1_key"
TAG_PHASE1_COMPLETE = "phase1_complete"  # set, after its artifacts, on the run that trained
TAG_PHASE1_RUN = "phase1_run_id"  # the run whose phase 1 this run used (itself if it trained)
TAG_FAILURE = "failure_reason"

FLUSH_SECONDS = 2.0


def _mlflow():
    import mlflow

    return mlflow


@functools.lru_cache(maxsize=1)  # one git call per process, not one per run
def code_version() -> str:
    """Package version plus the git commit of the working tree, when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def tracking_uri() -> str:
    return _mlflow().get_tracking_uri()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so the run ends KILLED instead of hanging RUNNING."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"terminated by signal {signum}")


class TrackedRun:
    """One MLflow run as a context manager.

    It ends FINISHED only when the block completes; an exception ends it FAILED and an
    interrupt (Ctrl-C, SIGTERM) KILLED, with the reason in the ``failure_reason`` tag.
    """

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 resume_run_id: str | None = None):
        self.experiment, self.run_name, self.resume_run_id = experiment, run_name, resume_run_id
        self.tags = {"code_version": code_version(), "command": " ".join(sys.argv),
                     **(tags or {})}
        self.run_id: str | None = None
        self._pending: list = []
        self._last_flush = time.monotonic()

    def __enter__(self) -> "TrackedRun":
        mlflow = _mlflow()
        # `mlflow run` creates a run for its command and passes its id in MLFLOW_RUN_ID; it
        # becomes the parent of the runs this process makes (with the resolved parameters),
        # and so does any run already active here (a study's parent run).
        launcher_run = os.environ.pop("MLFLOW_RUN_ID", None)
        if launcher_run and mlflow.active_run() is None:
            mlflow.start_run(run_id=launcher_run)
        parent = mlflow.active_run()
        if self.resume_run_id is not None:
            run = mlflow.start_run(run_id=self.resume_run_id, tags=self.tags,
                                   nested=parent is not None)
        elif parent is not None:
            run = mlflow.start_run(experiment_id=parent.info.experiment_id,
                                   run_name=self.run_name, tags=self.tags, nested=True)
        else:
            experiment_id = mlflow.set_experiment(self.experiment).experiment_id
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name,
                                   tags=self.tags)
        self.run_id = run.info.run_id
        self.experiment = mlflow.get_experiment(run.info.experiment_id).name
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) \
            if _in_main_thread() else None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        mlflow = _mlflow()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        try:
            self.flush()  # the curves up to a failure are worth keeping too
        except Exception:  # noqa: BLE001  (the run's own outcome matters more)
            if exc_type is None:
                raise
        if exc_type is None:
            mlflow.end_run("FINISHED")
            return False
        stopped = issubclass(exc_type, (KeyboardInterrupt, RunStopped))
        status = "KILLED" if stopped else "FAILED"
        reason = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
        try:
            mlflow.set_tag(TAG_FAILURE, reason[:5000])
        finally:
            mlflow.end_run(status)
        return False

    # Logging -------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        _mlflow().log_params({k: _param_text(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Per-epoch metrics (with ``step``) are buffered and written in batches, at most
        ``FLUSH_SECONDS`` apart, so short epochs do not wait on the store; the rest at once."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        if step is None or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            client = _mlflow().MlflowClient()
            for start in range(0, len(self._pending), 1000):  # MLflow's batch limit
                client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
            self._pending = []
        self._last_flush = time.monotonic()

    def set_tags(self, tags: dict[str, str]) -> None:
        _mlflow().set_tags(tags)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifacts(str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        _mlflow().log_artifact(str(local_path), artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        _mlflow().log_figure(figure, artifact_file)

    def log_training_subset(self, indices: np.ndarray, labels: np.ndarray, name: str,
                            source: dict[str, str]) -> str:
        """Log the exact training subset (indices into the dataset's training pool and their
        labels) as an MLflow dataset input; its digest identifies the subset.  Returns it."""
        mlflow = _mlflow()
        from mlflow.data.code_dataset_source import CodeDatasetSource

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_numpy(np.asarray(indices, dtype=np.int64),
                                             targets=np.asarray(labels, dtype=np.int64),
                                             name=name, source=CodeDatasetSource(source))
            mlflow.log_input(dataset, context="training")
        return dataset.digest


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


# Stage cache --------------------------------------------------------------------------------
def find_phase1_run(key: str) -> str | None:
    """The id of a run, in any experiment of the store, that trained phase 1 for ``key`` and
    logged all of its artifacts; the most recent one if several did."""
    mlflow = _mlflow()
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.{TAG_PHASE1_KEY} = '{key}' and tags.{TAG_PHASE1_COMPLETE} = 'true'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def download_artifacts(run_id: str, artifact_path: str) -> Path:
    """Local copy of a run's artifact folder (in a fresh temporary directory)."""
    target = tempfile.mkdtemp(prefix="benchmark-")
    # A cached phase 1 is a few files: MLflow's own progress bar would only clutter ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    path = _mlflow().artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                   dst_path=target)
    return Path(path)


def tag_active_run(tags: dict[str, str]) -> None:
    _mlflow().set_tags(tags)


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    """Tags on any run, open or ended (e.g. a trial's final state)."""
    client = _mlflow().MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def find_runs(experiment: str, filter_string: str = "", statuses: tuple[str, ...] = ("FINISHED",)):
    """Runs of ``experiment`` (by name) matching ``filter_string`` in the given states, newest
    first; an experiment that does not exist yet has none."""
    mlflow = _mlflow()
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"], output_format="list")
    # MLflow's filter language has no OR, so the states are picked here.
    return [run for run in runs if run.info.status in statuses]


# Reading runs back ----------------------------------------------------------------------------
def experiment_names() -> list[str]:
    """Names of the store's active (not deleted) experiments."""
    return sorted(e.name for e in _mlflow().search_experiments())


def finished_runs(experiment_names: list[str]):
    """Every FINISHED run of the named experiments as MLflow's search DataFrame (``run_id``,
    ``start_time``, ``params.*``, ``metrics.*``, ``tags.*``) plus the experiment's name in an
    ``experiment`` column.  Names the store does not hold are skipped."""
    mlflow = _mlflow()
    found = [mlflow.get_experiment_by_name(name) for name in experiment_names]
    names = {e.experiment_id: e.name for e in found if e is not None}
    if not names:
        import pandas as pd

        return pd.DataFrame(columns=["run_id", "experiment_id", "experiment", "start_time"])
    runs = mlflow.search_runs(experiment_ids=list(names),
                              filter_string="attributes.status = 'FINISHED'")
    return runs.assign(experiment=runs["experiment_id"].map(names))


def log_report(experiment: str, files: dict[str, list[Path]], params: dict[str, Any],
               tags: dict[str, str]) -> str:
    """One run in ``experiment`` holding a report's files as artifacts (``{artifact folder:
    files}``); it ends FINISHED only once every file is logged.  Returns its id."""
    with TrackedRun(experiment, "report", tags) as run:
        run.log_params(params)
        for folder, paths in files.items():
            for path in paths:
                run.log_artifact(path, folder)
    return run.run_id
