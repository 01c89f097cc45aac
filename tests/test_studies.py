"""Grids (only missing cells, shared phase 1) and Optuna studies (resumable, nested runs)."""
import textwrap

import mlflow
import optuna
import pytest

from benchmark import pipeline, studies
from benchmark.errors import UserError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def runs_in(experiment):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_smoke_sized_grid_runs_missing_cells_only_and_shares_phase1(mlflow_store, tmp_path):
    spec = write(tmp_path, "grid.yaml", """
        name: tiny
        experiment: tiny-grid
        datasets: [digits]
        losses: [ce]
        methods: [none, smote, eos]
        seeds: [0, 1]
        settings: {epochs: 1, head_epochs: 1}
    """)
    counts = studies.run_grid(spec, progress=False)
    assert counts["ran"] == 6 and counts["phase1_trained"] == 2 and counts["failed"] == 0
    finished = [r for r in runs_in("tiny-grid") if r.info.status == "FINISHED"]
    assert len(finished) == 6
    assert len({r.data.tags["phase1_run_id"] for r in finished}) == 2
    again = studies.run_grid(spec, progress=False)
    assert again["ran"] == 0 and again["already_finished"] == 6
    assert len(runs_in("tiny-grid")) == 6


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
    assert not any("test_bac" in r.data.metrics for r in trials)
    finals = [r for r in runs if r.data.tags.get("study_role") == "final"]
    assert len(finals) == 1 and "test_bac" in finals[0].data.metrics
    # One phase-1 training served every trial.
    assert sum(r.data.tags.get("phase1_complete") == "true" for r in runs) == 1
    assert parents[0].data.tags["best.trial"] == str(study.best_trial.number)
    assert parents[0].data.metrics["best_val_bac"] == pytest.approx(study.best_value)

    # Asking again changes nothing: no new trials, no second test evaluation.
    studies.run_study(spec, progress=False)
    assert len(runs_in("tiny-tuning")) == len(runs)


def test_study_spec_must_seed_its_sampler(tmp_path):
    spec = write(tmp_path, "s.yaml", STUDY.format(journal="j.log").replace(", seed: 0", ""))
    with pytest.raises(UserError, match="seed"):
        studies.StudySpec.from_file(spec)
