"""Grids (only missing cells, shared phase 1) and Optuna studies (resumable, nested runs)."""
import json
import os
import subprocess
import sys
import textwrap

import mlflow
import optuna
import pytest
import yaml

from benchmark import pipeline, schema, studies, tracking
from benchmark.__main__ import main
from benchmark.errors import UserError
from benchmark.registry import METHODS


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def runs_in(experiment):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def grid_parents(experiment):
    return [r for r in runs_in(experiment) if r.data.tags.get("grid_role") == "parent"]


def artifact(run, path):
    return mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{path}")


def summary_rows(run, name=studies.SUMMARY_TABLE):
    """A grid's (or a study's) summary table as the UI reads it: MLflow's table JSON."""
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{name}")
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def history(run, metric):
    return [(m.step, m.value) for m in sorted(
        mlflow.MlflowClient().get_metric_history(run.info.run_id, metric),
        key=lambda m: (m.timestamp, m.step))]


def fake_run_cell(cfg, *, progress=True, tags=None, **kwargs):
    """A cell's run in milliseconds: its tags and test scores, nothing trained."""
    with tracking.TrackedRun(cfg.experiment, f"fake-{cfg.method}-s{cfg.seed}", tags) as run:
        metrics = {schema.test(score): 0.5 + cfg.seed / 10 for score in schema.TEST_SCORES}
        run.log_metrics(metrics)
    return {"run_id": run.run_id, "metrics": metrics, "phase1_reused": True}


def test_smoke_sized_grid_runs_missing_cells_only_and_shares_phase1(mlflow_store, tmp_path):
    spec = write(tmp_path, "grid.yaml", """
        name: tiny
        experiment: tiny-grid
        datasets: [digits]
        losses: [ce]
        methods: [none, eos]
        seeds: [0, 1]
        settings: {epochs: 1, head_epochs: 1}
    """)
    counts = studies.run_grid(spec, progress=False)
    assert counts["ran"] == 4 and counts["phase1_trained"] == 2 and counts["failed"] == 0
    (parent,) = grid_parents("tiny-grid")
    cells = [r for r in runs_in("tiny-grid") if r.data.tags.get("grid_role") == "cell"]
    assert len(cells) == 4 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["phase1_run_id"] for r in cells}) == 2
    # The parent: named after the grid, its cells nested under it, the spec and cells with it.
    assert counts["parent_run_id"] == parent.info.run_id and parent.info.status == "FINISHED"
    assert parent.info.run_name == "tiny" and parent.data.tags["grid"] == "tiny"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in cells)
    assert artifact(parent, "spec.yaml") == spec.read_text()
    listed = artifact(parent, "cells.csv").splitlines()
    assert listed[0].startswith("cell,seed,cell_key,") and len(listed) == 5
    assert {r.data.tags["cell_key"] for r in cells} == {line.split(",")[2] for line in listed[1:]}
    # Progress at every cell, the step counting the cells processed.
    assert history(parent, "grid/cells_done") == [(n, n) for n in range(5)]
    assert history(parent, "grid/cells_failed") == [(n, 0) for n in range(5)]
    assert history(parent, "grid/cells_total")[-1] == (4, 4)
    # The summary: one row per cell with its run and test scores, shown by the UI as a table.
    rows = summary_rows(parent)
    by_run = {r.info.run_id: r for r in cells}
    assert sorted(row["run_id"] for row in rows) == sorted(by_run)
    for row in rows:
        run = by_run[row["run_id"]]
        assert row["status"] == "FINISHED" and row["when"] == "now"
        assert row["seed"] == int(run.data.params["seed"])
        assert row["cell"] == run.data.tags["cell"] and row["cell"].startswith("digits/")
        assert row["test/bac"] == pytest.approx(run.data.metrics["test/bac"])
    assert {"path": "grid_summary.json", "type": "table"} in \
        json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    assert artifact(parent, "grid_summary.csv").count("\n") == 5
    assert "4 cells, 4 finished" in parent.data.tags["mlflow.note.content"]
    experiment = mlflow.get_experiment_by_name("tiny-grid")
    assert experiment.tags["mlflow.note.content"].startswith(
        f"Grid tiny from {spec}: 4 cells (datasets digits; losses ce; methods none, eos;")

    # Again: nothing runs, no second parent; the same parent counts and lists the four cells.
    mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, "mlflow.note.content",
                                             "my own words")
    again = studies.run_grid(spec, progress=False)
    assert again["ran"] == 0 and again["already_finished"] == 4
    assert again["parent_run_id"] == parent.info.run_id
    assert len(runs_in("tiny-grid")) == 5
    (parent,) = grid_parents("tiny-grid")
    assert parent.info.status == "FINISHED" and parent.data.metrics["grid/cells_done"] == 4
    again_rows = summary_rows(parent)  # replaced, not appended to
    assert sorted((r["cell"], r["seed"], r["run_id"]) for r in again_rows) == \
        sorted((r["cell"], r["seed"], r["run_id"]) for r in rows)
    assert {row["when"] for row in again_rows} == {"earlier"}
    assert mlflow.get_experiment_by_name("tiny-grid").tags["mlflow.note.content"] == \
        "my own words"


def test_grid_parameter_axis_applies_only_to_methods_that_take_it(tmp_path):
    spec = write(tmp_path, "k.yaml", """
        datasets: [digits]
        methods: [none, eos]
        method_params: {k_neighbors: [5, 50]}
    """)
    cells = studies.Grid.from_spec(spec).cells
    described = sorted((c.method, c.method_params.get("k_neighbors")) for c in cells)
    assert described == [("eos", 5), ("eos", 50), ("none", None)]


def test_bad_grid_spec_fails_before_any_run(mlflow_store, tmp_path):
    spec = write(tmp_path, "bad.yaml", """
        datasets: [digits]
        methods: [eos, smote-typo]
    """)
    with pytest.raises(UserError, match="unknown method 'smote-typo'"):
        studies.run_grid(spec, progress=False)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    with pytest.raises(UserError, match="unknown key"):
        studies.Grid.from_spec(write(tmp_path, "typo.yaml", "dataset: [digits]\n"))


STUDY = """
    study: tiny-study
    experiment: tiny-tuning
    trials: 12
    cell: {{dataset: digits, loss: ce, method: eos, seed: 0, epochs: 1}}
    search_space:
      k_neighbors: {{type: int, low: 5, high: 300, log: true}}
      max_step: {{type: float, low: 0.05, high: 1.0}}
      head_epochs: {{type: int, low: 1, high: 3}}
    sampler: {{name: TPESampler, seed: 0, n_startup_trials: 4}}
    pruner: {{name: MedianPruner, n_startup_trials: 4, n_warmup_steps: 1}}
    storage: {journal}
"""


def test_study_survives_a_kill_and_ends_with_exactly_the_requested_trials(
        mlflow_store, tmp_path, monkeypatch):
    journal = tmp_path / "journal.log"
    spec = write(tmp_path, "study.yaml", STUDY.format(journal=journal))
    real_run_cell = pipeline.run_cell
    calls = {"n": 0}

    def killed_on_fourth_trial(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_cell", killed_on_fourth_trial)
    with pytest.raises(KeyboardInterrupt):
        studies.run_study(spec, progress=False)
    monkeypatch.setattr(pipeline, "run_cell", real_run_cell)
    (parent,) = [r for r in runs_in("tiny-tuning") if r.data.tags.get("study_role") == "study"]
    assert parent.info.status == "KILLED"

    result = studies.run_study(spec, progress=False)
    study = optuna.load_study(study_name="tiny-study", storage=studies.make_storage(str(journal)))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert result["completed"] == len(complete) == 12

    runs = runs_in("tiny-tuning")
    parents = [r for r in runs if r.data.tags.get("study_role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    trials = [r for r in runs if r.data.tags.get("study_role") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in trials)
    completed_runs = [r for r in trials if r.data.tags.get("trial_state") == "COMPLETE"]
    assert len(completed_runs) == 12 and all(r.info.status == "FINISHED" for r in completed_runs)
    # Trials never see the test set; only the final evaluation does, once.
    assert not any("test/bac" in r.data.metrics for r in trials)
    finals = [r for r in runs if r.data.tags.get("study_role") == "final"]
    assert len(finals) == 1 and "test/bac" in finals[0].data.metrics
    # One phase-1 training served every trial.
    assert sum(r.data.tags.get("phase1_complete") == "true" for r in runs) == 1
    assert parents[0].data.tags["best.trial"] == str(study.best_trial.number)
    assert parents[0].data.metrics["study/best_val_bac"] == pytest.approx(study.best_value)
    # The parent carries the spec and a table of every trial, the killed one included.
    assert artifact(parents[0], "spec.yaml") == spec.read_text()
    rows = {row["trial"]: row for row in summary_rows(parents[0], studies.TRIALS_TABLE)}
    assert sorted(rows) == [t.number for t in study.get_trials()]
    trial_runs = {r.data.tags["optuna_trial"]: r.info.run_id for r in trials}
    for t in study.get_trials():
        row = rows[t.number]
        assert row["state"] == t.state.name and row["k_neighbors"] == t.params.get("k_neighbors")
        assert row["val/bac"] == (pytest.approx(t.value) if t.value is not None else None)
        assert row["run_id"] == trial_runs.get(str(t.number), "")
    assert [row["state"] for row in rows.values()].count("COMPLETE") == 12
    assert "FAIL" in [row["state"] for row in rows.values()]  # the killed trial
    assert mlflow.get_experiment_by_name("tiny-tuning").tags["mlflow.note.content"].startswith(
        f"Optuna study tiny-study from {spec}: 12 trials of digits/")

    # Asking again changes nothing: no new trials, no second test evaluation.
    studies.run_study(spec, progress=False)
    assert len(runs_in("tiny-tuning")) == len(runs)


def test_study_spec_must_seed_its_sampler(tmp_path):
    spec = write(tmp_path, "s.yaml", STUDY.format(journal="j.log").replace(", seed: 0", ""))
    with pytest.raises(UserError, match="seed"):
        studies.StudySpec.from_file(spec)


# Grid spec mistakes ---------------------------------------------------------------------------
GRID_HEAD = "datasets: [digits]\nmethods: [none]\n"


@pytest.mark.parametrize("body, key", [
    (GRID_HEAD + "seeds: [abc]\n", "seed"),
    (GRID_HEAD + "settings: {epochs: ten}\n", "epochs"),
    (GRID_HEAD + "settings: {val_fraction: '0.2'}\n", "val_fraction"),
    ("datasets: {a: 1}\n", "datasets"),
    ("datasets: [digits, [mnist5k]]\n", "datasets"),
    ("datasets: []\n", "datasets"),
    (GRID_HEAD + "settings: [1, 2]\n", "settings"),
    (GRID_HEAD + "blocks: 5\n", "blocks"),
    (GRID_HEAD + "blocks: [5]\n", "blocks[0]"),
    (GRID_HEAD + "blocks: [{losses: {ce: 1}}]\n", "blocks[0].losses"),
    (GRID_HEAD + "blocks: [{dataset: digits}]\n", "blocks[0]"),
    (GRID_HEAD + "blocks: [{settings: 3}]\n", "blocks[0].settings"),
    (GRID_HEAD + "method_params: [k_neighbors, 5]\n", "method_params"),
    ("datasets: [digits]\nmethods: [eos]\nmethod_params: {k_neighbors: {low: 5}}\n",
     "method_params.k_neighbors"),
    (GRID_HEAD + "settings: {method_params: 5}\n", "method_params"),
    (GRID_HEAD + "experiment: [a, b]\n", "experiment"),
])
def test_grid_spec_mistakes_are_one_line_naming_file_and_key_before_any_run(
        mlflow_store, tmp_path, body, key):
    spec = write(tmp_path, "bad.yaml", body)
    with pytest.raises(UserError) as raised:
        studies.run_grid(spec, progress=False)
    message = str(raised.value)
    assert message.startswith(f"{spec}: ") and key in message and "\n" not in message
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_grid_spec_mistake_exits_2_with_one_line_from_the_command_line(mlflow_store, tmp_path,
                                                                       capsys):
    spec = write(tmp_path, "bad.yaml", GRID_HEAD + "settings: {val_fraction: '0.2'}\n")
    assert main(["grid", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {spec}: ") and "val_fraction" in err and err.count("\n") == 1
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


# A grid survives a failing cell ------------------------------------------------------------------
class _Exploding:
    def fit_resample(self, x, y):
        raise RuntimeError("resampler exploded")


def test_grid_records_a_failed_cell_runs_the_others_and_exits_1(mlflow_store, tmp_path,
                                                                monkeypatch, capsys):
    spec = write(tmp_path, "grid.yaml", """
        name: fragile
        experiment: fragile
        datasets: [digits]
        methods: [none, smote, eos]
        settings: {epochs: 1, head_epochs: 1}
    """)
    # smote fails inside its run (phase 3), eos before its run exists (data preparation).
    monkeypatch.setattr(METHODS.get("smote"), "embedding_resampler",
                        lambda self, random_state: _Exploding())
    real_prepare = pipeline.prepare_data

    def prepare_data(cfg, *args, **kwargs):
        if cfg.method == "eos":
            raise RuntimeError("disk on fire")
        return real_prepare(cfg, *args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_data", prepare_data)
    assert main(["grid", str(spec), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "1 ran ok now" in out and "2 failed" in out
    failed = sorted(line for line in out.splitlines() if line.startswith("  failed: "))
    assert len(failed) == 2
    assert "digits/exp10/resnet32/ce/eos seed 0: RuntimeError: disk on fire" in failed[0]
    assert "digits/exp10/resnet32/ce/smote seed 0: RuntimeError: resampler exploded" in failed[1]
    (parent,) = grid_parents("fragile")
    runs = {r.data.tags["method"]: r for r in runs_in("fragile") if r.data.tags.get("method")}
    assert set(runs) == {"none", "smote"}  # eos failed before its run existed
    assert runs["none"].info.status == "FINISHED"
    assert runs["smote"].info.status == "FAILED"
    assert "resampler exploded" in runs["smote"].data.tags["failure_reason"]
    # The parent ends FAILED, says how many cells failed and lists them with their runs.
    assert parent.info.status == "FAILED"
    assert "2 of 3 cells failed" in parent.data.tags["failure_reason"]
    assert parent.data.metrics["grid/cells_failed"] == 2
    assert parent.data.metrics["grid/cells_done"] == 1
    rows = {row["cell"].rsplit("/", 1)[1]: row for row in summary_rows(parent)}
    assert rows["none"]["status"] == "FINISHED" and rows["none"]["run_id"] == \
        runs["none"].info.run_id
    assert rows["smote"]["status"] == "FAILED" and rows["smote"]["run_id"] == \
        runs["smote"].info.run_id and "resampler exploded" in rows["smote"]["failure_reason"]
    assert rows["eos"]["status"] == "FAILED" and rows["eos"]["run_id"] == "" and \
        rows["eos"]["test/bac"] is None
    # Running the grid again retries only the failed cells, under the same parent.
    counts = studies.run_grid(spec, progress=False)
    assert counts["already_finished"] == 1 and counts["failed"] == 2
    assert grid_parents("fragile")[0].info.run_id == parent.info.run_id
    assert len(grid_parents("fragile")) == 1 and len(summary_rows(parent)) == 3
    # Once the failed cells succeed, the same parent ends FINISHED, its old reason gone.
    monkeypatch.setattr(pipeline, "run_cell", fake_run_cell)
    assert studies.run_grid(spec, progress=False)["ran"] == 2
    (parent,) = grid_parents("fragile")
    assert parent.info.status == "FINISHED" and "failure_reason" not in parent.data.tags
    assert parent.data.metrics["grid/cells_failed"] == 0
    assert [row["status"] for row in summary_rows(parent)] == ["FINISHED"] * 3


def test_grid_stops_at_once_on_a_user_mistake_in_its_first_cell_and_on_an_interrupt(
        mlflow_store, tmp_path, monkeypatch):
    spec = write(tmp_path, "grid.yaml", "datasets: [digits]\nmethods: [none, smote]\n")
    calls = []

    def missing_data(cfg, *args, **kwargs):
        calls.append(cfg.method)
        raise UserError("dataset 'digits' not found")

    monkeypatch.setattr(pipeline, "prepare_data", missing_data)
    with pytest.raises(UserError, match="not found"):
        studies.run_grid(spec, progress=False)
    assert len(calls) == 1
    assert runs_in("grid-grid") == []  # the parent made for it went again

    def interrupted(*args, **kwargs):
        calls.append("interrupted")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        studies.run_grid(spec, progress=False)
    assert calls.count("interrupted") == 1
    (parent,) = grid_parents("grid-grid")
    assert parent.info.status == "KILLED"
    assert [row["status"] for row in summary_rows(parent)] == ["NOT RUN", "NOT RUN"]


def test_grid_under_mlflow_run_nests_its_parent_under_the_project_run_and_finds_it_again(
        mlflow_store, tmp_path, monkeypatch):
    spec = write(tmp_path, "grid.yaml", """
        name: launched
        datasets: [digits]
        methods: [none, smote]
    """)
    monkeypatch.setattr(pipeline, "run_cell", fake_run_cell)
    # A fresh process, as `mlflow run` starts: no experiment chosen by an earlier test.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    client = mlflow.MlflowClient()
    default = client.get_experiment_by_name("Default").experiment_id
    project_runs = []
    for _ in range(2):  # `mlflow run -e grid` twice: a new project run each time
        project_runs.append(client.create_run(default).info.run_id)
        monkeypatch.setenv("MLFLOW_RUN_ID", project_runs[-1])
        counts = studies.run_grid(spec, progress=False)
        mlflow.end_run()  # the project run, ended by `mlflow run` itself
    assert counts["ran"] == 0 and counts["already_finished"] == 2
    (parent,) = grid_parents("Default")
    assert parent.data.tags["mlflow.parentRunId"] == project_runs[0]
    cells = [r for r in runs_in("Default") if r.data.tags.get("grid_role") == "cell"]
    assert len(cells) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in cells)
    assert parent.info.status == "FINISHED" and len(summary_rows(parent)) == 2


# Study spec mistakes ----------------------------------------------------------------------------
BASE_STUDY = {"study": "bad", "experiment": "bad-tuning", "trials": 3,
              "cell": {"dataset": "digits", "method": "eos", "epochs": 1, "head_epochs": 1},
              "search_space": {"k_neighbors": {"type": "int", "low": 5, "high": 50}},
              "sampler": {"name": "TPESampler", "seed": 0}, "pruner": {"name": "NopPruner"}}


def int_range(**dist):
    return {"search_space": {"k_neighbors": {"type": "int", **dist}}}


@pytest.mark.parametrize("change, key", [
    (int_range(high=50), "low"),
    (int_range(low=5), "high"),
    (int_range(low=300, high=5), "low (300) is above high (5)"),
    (int_range(low=5.5, high=50), "low"),
    (int_range(low=5, high=50, step=5), "step"),
    ({"search_space": {"max_step": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
     "log"),
    ({"sampler": "TPESampler"}, "sampler"),
    ({"sampler": {"name": "TPESampler", "seed": "zero"}}, "seed"),
    ({"sampler": {"name": "TPESamplr", "seed": 0}}, "TPESamplr"),
    ({"pruner": "MedianPruner"}, "pruner"),
    ({"cell": "digits"}, "cell"),
    ({"cell": {"dataset": "digits", "val_fraction": "0.2"}}, "val_fraction"),
    ({"search_space": ["k_neighbors"]}, "search_space"),
    ({"search_space": {}}, "search_space"),
    ({"search_space": {"k_neighbors": {"type": "categorical"}}}, "choices"),
    ({"search_space": {"k_neighbors": {"type": "categorical", "choices": []}}}, "choices"),
    ({"search_space": {"k_neighbors": {"type": "normal", "low": 1, "high": 2}}}, "normal"),
    ({"search_space": {"k_neighbors": 5}}, "search_space.k_neighbors"),
    ({"search_space": {"max_step": {"type": "float", "low": 0.5, "high": 2.0}}}, "max_step"),
    ({"search_space": {"kneighbors": {"type": "int", "low": 5, "high": 50}}}, "kneighbors"),
    ({"trials": 0}, "trials"),
    ({"trials": "six"}, "trials"),
    ({"trials": True}, "trials"),
    ({"studdy": "typo"}, "studdy"),
])
def test_study_spec_mistakes_are_one_line_before_anything_is_created(
        mlflow_store, tmp_path, change, key):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**BASE_STUDY, **change}))
    journal = tmp_path / "journal.log"
    with pytest.raises(UserError) as raised:
        studies.run_study(spec, storage=str(journal), progress=False)
    message = str(raised.value)
    assert message.startswith(f"{spec}: ") and key in message and "\n" not in message
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert not journal.exists()


# Several processes on one study -------------------------------------------------------------------
def test_two_processes_share_a_study_exactly(mlflow_store, tmp_path):
    trials = 4
    spec = tmp_path / "shared.yaml"
    spec.write_text(yaml.safe_dump({
        "study": "shared", "experiment": "shared-tuning", "trials": trials,
        "cell": {"dataset": "digits", "method": "eos", "epochs": 1, "head_epochs": 1},
        "search_space": {"k_neighbors": {"type": "int", "low": 3, "high": 30}},
        "sampler": {"name": "TPESampler", "seed": 0}, "pruner": {"name": "NopPruner"}}))
    journal = tmp_path / "journal.log"
    command = [sys.executable, "-m", "benchmark", "tune", str(spec), "--storage", str(journal),
               "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small machine
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(2)]
    outputs = [process.communicate(timeout=240) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]

    study = optuna.load_study(study_name="shared", storage=studies.make_storage(str(journal)))
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == trials
    assert optuna.trial.TrialState.RUNNING not in states
    runs = runs_in("shared-tuning")
    assert sum(r.data.tags.get("phase1_complete") == "true" for r in runs) == 1
    finals = [r for r in runs if r.data.tags.get("study_role") == "final"]
    assert len(finals) == 1
    (parent,) = [r for r in runs if r.data.tags.get("study_role") == "study"]
    # The table written last (under the lock) saw every trial ended.
    rows = summary_rows(parent, studies.TRIALS_TABLE)
    assert sorted(row["trial"] for row in rows) == [t.number for t in study.get_trials()]
    assert [row["state"] for row in rows].count("COMPLETE") == trials
    assert "RUNNING" not in [row["state"] for row in rows] and all(row["run_id"] for row in rows)
    # Both processes report the one test evaluation.
    assert all(f"(run {finals[0].info.run_id})" in out for out, _ in outputs)


def test_trials_of_a_killed_process_are_failed_and_replaced(mlflow_store, tmp_path):
    journal = tmp_path / "journal.log"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**BASE_STUDY, "trials": 2}))
    study = optuna.create_study(study_name="bad", storage=studies.make_storage(str(journal)),
                                direction="maximize")
    orphan = study.ask()  # left RUNNING by a process that no longer exists
    orphan.set_user_attr(studies.ATTR_WORKER, "gone")
    result = studies.run_study(spec, storage=str(journal), progress=False)
    assert result["completed"] == 2
    states = {t.number: t.state for t in study.get_trials()}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    assert list(states.values()).count(optuna.trial.TrialState.COMPLETE) == 2


def test_only_trials_whose_process_is_gone_are_failed(tmp_path):
    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name="s", storage=studies.make_storage(str(journal)))
    locks = studies.StudyLocks(str(journal), "s")
    alive = studies.FileLock(locks.folder / "worker-alive.lock")
    alive.acquire()  # another process at work
    (locks.folder / "worker-killed.lock").touch()  # its process died holding it: now free
    owners = ["alive", "killed", None]
    for owner in owners:
        trial = study.ask()
        if owner:
            trial.set_user_attr(studies.ATTR_WORKER, owner)
    try:
        assert locks.fail_dead_trials(study) == [1, 2]
    finally:
        alive.release()
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "FAIL", "FAIL"]
    assert not (locks.folder / "worker-killed.lock").exists()


def test_a_grid_claims_the_stages_a_cell_would_train_and_the_phase1s_its_method_uses(
        mlflow_store, tiny_config):
    cache = studies._StageCache()
    gan = tiny_config(method="cgan").resolved()
    plain = tiny_config(method="none").resolved()
    needs = studies._stages_to_train(gan, cache)
    assert needs == [("phase1", gan.phase1_key()),
                     ("training_set", gan.training_set_key()),
                     ("phase1", plain.phase1_key())]  # its Frechet figure's none model
    quiet = tiny_config(method="cgan", method_params={"frechet": False}).resolved()
    assert ("phase1", plain.phase1_key()) not in studies._stages_to_train(quiet, cache)
    assert studies._stages_to_train(plain, cache) == [("phase1", plain.phase1_key())]


def test_a_finished_grid_run_again_with_progress_runs_nothing_and_says_so(
        mlflow_store, tmp_path, monkeypatch, capsys):
    spec = write(tmp_path, "grid.yaml", "datasets: [digits]\nmethods: [none, smote]\n")
    monkeypatch.setattr(pipeline, "run_cell", fake_run_cell)
    assert studies.run_grid(spec, progress=True)["ran"] == 2
    again = studies.run_grid(spec, progress=True)
    assert again["ran"] == 0 and again["already_finished"] == 2
    assert capsys.readouterr().out.count("2 of 2 cells to run") == 1  # the first pass only
