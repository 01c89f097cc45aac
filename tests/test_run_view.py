"""What a researcher sees of one run: readable identity, description, per-class table, the model."""
import json

import mlflow
import numpy as np

from benchmark import tracking
from benchmark.pipeline import load_dataset, run_cell


def test_a_default_run_is_readable_and_serves_its_model(mlflow_store, tiny_config):
    result = run_cell(tiny_config(log_model=True, system_metrics=True), progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["cell"] == "digits/exp10/resnet32/ce/eos"
    assert run.data.tags["seed"] == "0"
    note = run.data.tags[tracking.NOTE]
    assert f"BAC **{result['metrics']['test/bac']:.4f}**" in note
    assert "Phase 1 trained in this run" in note
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert "Group by the `cell` tag" in experiment.tags[tracking.NOTE]
    assert "test/bac" in run.data.metrics
    client = mlflow.MlflowClient()
    results = {a.path for a in client.list_artifacts(run.info.run_id, "results")}
    assert {"results/per_class.json", "results/recall_by_class.png",
            "results/confusion_matrix.png"} <= results
    assert "results/model.pt" not in results  # the extractor is stored in phase1/ only
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/results/per_class.json"))
    assert table["columns"][:2] == ["class", "train_real"] and len(table["data"]) == 10

    # The logged model takes uint8 images and predicts what the run evaluated.
    (model_info,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list")
    model = mlflow.pyfunc.load_model(f"models:/{model_info.model_id}")
    _, test = load_dataset("digits", None, False)
    logits = model.predict(test.images.numpy())
    recall = [np.mean(logits[test.labels.numpy() == c].argmax(1) == c) for c in range(10)]
    assert np.mean(recall) == result["metrics"]["test/bac"]


def test_a_reused_phase1_is_linked_from_the_description(mlflow_store, tiny_config):
    first = run_cell(tiny_config(method="none"), progress=False)
    second = run_cell(tiny_config(method="smote", method_params={"k_neighbors": 3}),
                      progress=False)
    run = mlflow.get_run(second["run_id"])
    assert run.data.tags["cell"] == "digits/exp10/resnet32/ce/smote k_neighbors=3"
    assert f"[run {first['run_id']}](#/experiments/" in run.data.tags[tracking.NOTE]


def test_the_model_can_be_registered(mlflow_store, tiny_config):
    run_cell(tiny_config(method="none", epochs=1, register="digits-none"), progress=False)
    versions = mlflow.MlflowClient().search_model_versions("name='digits-none'")
    assert len(versions) == 1
