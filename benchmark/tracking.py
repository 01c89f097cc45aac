"""The only module that talks to MLflow: runs, their end states, artifacts and the stage cache."""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmark import __version__, store
from benchmark.errors import RunStopped

store.bound_http_retries()  # every MLflow call of the process, not only those made here
_log = logging.getLogger(__name__)

# Tag names the suite writes and reads.
TAG_PHASE1_KEY = "phase1_key"
TAG_PHASE1_COMPLETE = "phase1_complete"  # set, after its artifacts, on the run that trained
TAG_PHASE1_RUN = "phase1_run_id"  # the run whose phase 1 this run used (itself if it trained)
TAG_FAILURE = "failure_reason"
# Who runs a run, so that a later command can tell a live run from one whose process was
# killed (kill -9, out of memory, power loss) and left it RUNNING.
TAG_HOST = "process_host"
TAG_PID = "process_id"
TAG_PROCESS_START = "process_start"  # "<boot id>:<start time in clock ticks>" (Linux)
TAG_HEARTBEAT = "heartbeat"  # UTC time, refreshed every HEARTBEAT_SECONDS while the run is open
TAG_MARKED_BY = "marked_killed_by"  # the process that marked a dead run KILLED

HEARTBEAT_SECONDS = 30.0
# Only for runs of other hosts, where the process itself cannot be looked at: generous, so a
# busy or briefly suspended machine is not taken for dead.
STALE_AFTER_SECONDS = 15 * 60

FLUSH_SECONDS = 2.0


# MLflow announces the start and end of its system-metrics sampler on every run; progress bars
# and the closing summary line are what a user should see.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


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
    interrupt (Ctrl-C, SIGTERM) KILLED, with the reason in the ``failure_reason`` tag.  While
    open it carries its process's identity and a heartbeat, so that a run whose process was
    killed outright can be told apart and marked KILLED later (``mark_dead_runs``).
    """

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 resume_run_id: str | None = None, system_metrics: bool = False,
                 experiment_description: str | None = None):
        self.experiment, self.run_name, self.resume_run_id = experiment, run_name, resume_run_id
        # MLflow samples CPU, memory (and GPU with pynvml) every 10 s when psutil is there.
        self.system_metrics = system_metrics and _has_module("psutil")
        self.experiment_description = experiment_description
        self.tags = {"code_version": code_version(), "command": " ".join(sys.argv),
                     **process_tags(), **(tags or {})}
        self.run_id: str | None = None
        self._heartbeat: _Heartbeat | None = None
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
        tags = {**self.tags, TAG_HEARTBEAT: _utc_text(time.time())}
        sampling = {"log_system_metrics": self.system_metrics}
        if self.resume_run_id is not None:
            run = mlflow.start_run(run_id=self.resume_run_id, tags=tags,
                                   nested=parent is not None, **sampling)
        elif parent is not None:
            run = mlflow.start_run(experiment_id=parent.info.experiment_id,
                                   run_name=self.run_name, tags=tags, nested=True, **sampling)
        else:
            experiment = mlflow.set_experiment(self.experiment)
            # An experiment keeps the artifact folder it was created with, which may lie
            # elsewhere than the store's default one checked by `prepare_store`.
            store.check_artifact_location(
                experiment.artifact_location, f"experiment '{experiment.name}'",
                "make that folder writable or log to another experiment")
            run = mlflow.start_run(experiment_id=experiment.experiment_id,
                                   run_name=self.run_name, tags=tags, **sampling)
        self.run_id = run.info.run_id
        if self.resume_run_id is not None and \
                TAG_FAILURE in mlflow.get_run(self.run_id).data.tags:
            # The reason an earlier pass ended it for: this pass ends it anew.
            mlflow.MlflowClient().delete_tag(self.run_id, TAG_FAILURE)
        if self.experiment_description:
            describe_experiment(run.info.experiment_id, self.experiment_description)
        self._heartbeat = _Heartbeat(self.run_id, mlflow.get_tracking_uri())
        self.experiment = mlflow.get_experiment(run.info.experiment_id).name
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) \
            if _in_main_thread() else None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        mlflow = _mlflow()
        if self._heartbeat is not None:
            self._heartbeat.stop()
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


    def describe(self, text: str) -> None:
        """The run's description (MLflow's note, shown on top of its page; markdown)."""
        _mlflow().set_tag(NOTE, text)

    def log_table(self, frame, artifact_file: str) -> None:
        """A table the UI shows in its table view (and compares across runs).  Logged again
        under the same name it replaces the old one, where MLflow's ``log_table`` would append
        to it (a grid's or a study's summary, rewritten by every rerun)."""
        mlflow = _mlflow()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(artifact_file).name
            frame.to_json(path, orient="split", index=False, date_format="iso")  # log_table's
            mlflow.log_artifact(str(path), str(Path(artifact_file).parent).strip(".") or None,
                                run_id=self.run_id)
        # The tag by which the UI shows the file as a table, as ``log_table`` sets it.
        logged = json.loads(mlflow.get_run(self.run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        if {"path": artifact_file, "type": "table"} not in logged:
            set_run_tags(self.run_id, {LOGGED_ARTIFACTS: json.dumps(
                [*logged, {"path": artifact_file, "type": "table"}])})

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text file (a spec, a CSV) as an artifact; logged again, it replaces the old one."""
        _mlflow().log_text(text, artifact_file, run_id=self.run_id)

    def log_model(self, model, example: np.ndarray, register: str | None = None) -> str:
        """``model`` as an MLflow PyTorch model under ``model``, with a signature and an input
        example, loadable with ``mlflow.pyfunc.load_model``; ``register`` also puts it in the
        model registry under that name.  Returns its URI."""
        import torch
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        # Naming the requirements skips MLflow's import scan (seconds per run).
        requirements = [f"torch=={torch.__version__.split('+')[0]}",
                        f"eos-benchmark=={__version__}"]
        info = _mlflow().pytorch.log_model(
            model, name="model", signature=infer_signature(example, output),
            input_example=example, pip_requirements=requirements,
            registered_model_name=register,
            # MLflow would reload the model to predict the example (seconds per run);
            # tests/test_run_view.py checks that a logged model serves uint8 images.
            validate_serving_input=False)
        return info.model_uri


NOTE = "mlflow.note.content"  # MLflow's description of a run or an experiment
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # which artifacts the UI shows as tables


def describe_experiment(experiment_id: str, text: str) -> None:
    """Set an experiment's description unless it has one (a user's own stays)."""
    client = _mlflow().MlflowClient()
    if NOTE not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, NOTE, text)


def run_link(run_id: str) -> str:
    """The UI's address of a run, relative to the UI's root (works as a markdown link in a
    description)."""
    run = _mlflow().get_run(run_id)
    return f"#/experiments/{run.info.experiment_id}/runs/{run_id}"


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


# Store preparation and runs left RUNNING by dead processes ----------------------------------
def prepare_store(mark_dead: bool = True, write: bool = True) -> list["DeadRun"]:
    """Check, before any work, that the tracking store answers and takes writes (only that it
    can be read with ``write=False``), and create a new SQLite store's tables under a lock
    (see ``store.prepare``); ``UserError`` otherwise.  Then, if ``mark_dead`` and ``write``,
    mark KILLED the runs whose process died without ending them, with a note on stderr for
    each.  Returns those runs."""
    store.prepare(tracking_uri(), write)
    if not (mark_dead and write):
        return []
    dead, _ = mark_dead_runs()
    for run in dead:
        print(f"note: {run.describe()}", file=sys.stderr)
    return dead


def process_tags() -> dict[str, str]:
    """This process's identity as run tags: host, process id and start."""
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
            TAG_PROCESS_START: _process_start(os.getpid()) or ""}


def _process_start(pid: int) -> str | None:
    """``<boot id>:<start time in clock ticks>`` of a live process (Linux), which no other
    process shares, even one that reuses its id later; ``None`` when it is gone (or a zombie)
    or /proc is missing."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (2nd field) may hold spaces and parentheses; the rest follows its ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    state, start_ticks = fields[0], fields[19]
    return None if state in ("Z", "X") else f"{boot_id}:{start_ticks}"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _utc_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_seconds(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


class _Heartbeat:
    """Refreshes a run's heartbeat tag every ``HEARTBEAT_SECONDS`` from a daemon thread with
    its own client, from construction until ``stop``.  A failed beat is logged, never raised:
    the run matters more than its heartbeat."""

    def __init__(self, run_id: str, uri: str):
        self.run_id, self.uri = run_id, uri
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        client, failing = None, False
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            try:
                client = client or _mlflow().MlflowClient(tracking_uri=self.uri)
                client.set_tag(self.run_id, TAG_HEARTBEAT, _utc_text(time.time()))
                failing = False
            except Exception as err:  # noqa: BLE001
                if not failing:  # once per outage, not every 30 s
                    _log.warning("heartbeat of run %s not recorded: %s", self.run_id, err)
                failing = True

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)  # a beat stuck on a slow server must not hold the run


@dataclass(frozen=True)
class DeadRun:
    """A run left RUNNING by a process that is gone, as ``mark_dead_runs`` marked it."""

    run_id: str
    run_name: str
    experiment: str
    reason: str

    def describe(self) -> str:
        return (f"marked run {self.run_id} ({self.run_name}, experiment '{self.experiment}') "
                f"KILLED: {self.reason}")


def dead_reason(tags: dict[str, str], start_time_ms: int, now: float) -> str | None:
    """Why a RUNNING run with these tags is dead, or ``None`` while it may be alive.  On this
    host the process is looked at; for another host, only a heartbeat older than
    ``STALE_AFTER_SECONDS`` counts.  Runs without process tags (another tool's) are left."""
    host, pid_text = tags.get(TAG_HOST), tags.get(TAG_PID, "")
    if not host or not pid_text.isdigit():
        return None
    pid, recorded_start = int(pid_text), tags.get(TAG_PROCESS_START, "")
    here = process_tags()
    same_boot = recorded_start.split(":")[0] == here[TAG_PROCESS_START].split(":")[0]
    if host == here[TAG_HOST] and same_boot:  # same machine, not rebooted since
        if recorded_start:
            current = _process_start(pid)
            if current == recorded_start:
                return None
            gone = "is gone" if current is None else "is gone (its id is now another process's)"
        elif _pid_exists(pid):
            return None
        else:
            gone = "is gone"
        return (f"its process {pid} on {host} {gone}; it was killed (kill -9, out of memory) or "
                f"crashed without ending the run")
    beat = _utc_seconds(tags.get(TAG_HEARTBEAT, "")) or start_time_ms / 1000
    if now - beat <= STALE_AFTER_SECONDS:
        return None
    return (f"no heartbeat from its process {pid} on {host} since {_utc_text(beat)} "
            f"({(now - beat) / 60:.0f} min); presumed killed")


def mark_dead_runs() -> tuple[list[DeadRun], int]:
    """Mark KILLED (with the reason in ``failure_reason``) every RUNNING run of the store whose
    process died without ending it (see ``dead_reason``).  Returns those runs and the number
    of RUNNING runs left alone."""
    mlflow = _mlflow()
    running = mlflow.search_runs(search_all_experiments=True,
                                 filter_string="attributes.status = 'RUNNING'",
                                 output_format="list")
    client, me, marked = mlflow.MlflowClient(), process_tags(), []
    for run in running:
        if dead_reason(run.data.tags, run.info.start_time, time.time()) is None:
            continue
        # Read again once the process is known gone: it may have ended its run just before.
        run = client.get_run(run.info.run_id)
        now = time.time()
        reason = dead_reason(run.data.tags, run.info.start_time, now) \
            if run.info.status == "RUNNING" else None
        if reason is None:
            continue
        client.set_tag(run.info.run_id, TAG_FAILURE, reason)
        client.set_tag(run.info.run_id, TAG_MARKED_BY,
                       f"process {me[TAG_PID]} on {me[TAG_HOST]} at {_utc_text(now)}")
        # The run ended at its last sign of life, not now.
        last = _utc_seconds(run.data.tags.get(TAG_HEARTBEAT, "")) or run.info.start_time / 1000
        client.set_terminated(run.info.run_id, "KILLED", end_time=int(last * 1000))
        experiment = client.get_experiment(run.info.experiment_id)
        marked.append(DeadRun(run.info.run_id, run.info.run_name, experiment.name, reason))
    return marked, len(running) - len(marked)


# Stage cache --------------------------------------------------------------------------------
def find_stage_run(stage: str, key: str) -> str | None:
    """The id of a run, in any experiment of the store, that computed the cached ``stage``
    (``phase1``, ``training_set``) for ``key`` and logged all of its artifacts (tags
    ``<stage>_key`` and ``<stage>_complete``); the most recent one if several did."""
    mlflow = _mlflow()
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.{stage}_key = '{key}' and tags.{stage}_complete = 'true'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def find_phase1_run(key: str) -> str | None:
    return find_stage_run("phase1", key)


TAG_CHECKPOINT_EPOCH = "phase1_checkpoint_epoch"  # the epoch the run's checkpoint/ holds


def find_resumable_run(key: str) -> str | None:
    """The newest run that was training phase 1 for ``key`` when it was killed or failed and
    left a checkpoint: a new run for the same key resumes from it.  A run still RUNNING is
    left alone (it may be alive; a dead one is marked KILLED first)."""
    runs = _mlflow().search_runs(
        search_all_experiments=True,
        filter_string=f"tags.{TAG_PHASE1_KEY} = '{key}' and tags.{TAG_CHECKPOINT_EPOCH} != ''",
        order_by=["attributes.start_time DESC"], output_format="list")
    for run in runs:
        if run.info.status in ("KILLED", "FAILED") and \
                run.data.tags.get(TAG_PHASE1_COMPLETE) != "true":
            return run.info.run_id
    return None


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


def logging_experiment(default: str) -> str:
    """The experiment a ``TrackedRun`` opened now logs to: that of the run it nests under (one
    active in this process, or the one ``mlflow run`` made, named in ``MLFLOW_RUN_ID``), else
    ``default``."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    run_id = active.info.run_id if active is not None else os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return default
    return mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name


def delete_run(run_id: str) -> None:
    """Move a run to MLflow's trash (a grid's new parent run whose first cell met a user
    mistake: the grid never started)."""
    _mlflow().MlflowClient().delete_run(run_id)


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
               tags: dict[str, str], run_name: str = "report", description: str = "",
               experiment_description: str | None = None) -> str:
    """One run in ``experiment`` holding a report's files as artifacts (``{artifact folder:
    files}``, the folder "" for the root); it ends FINISHED only once every file is logged.
    ``description``: the run's note.  Returns its id."""
    with TrackedRun(experiment, run_name, tags,
                    experiment_description=experiment_description) as run:
        if description:
            run.describe(description)
        run.log_params(params)
        for folder, paths in files.items():
            for path in paths:
                run.log_artifact(path, folder)
    return run.run_id
