"""End-to-end cells on the embedded digits data: logging, stage cache, determinism, failures."""
import math

import mlflow
import numpy as np
import pytest

from benchmark.errors import DivergenceError, UserError
from benchmark.pipeline import run_cell

SUMMARY_METRICS = ("test/bac", "test/gm", "test/gm_macro", "test/f1_macro", "test/accuracy",
                   "gap/overall", "time/phase1_s", "time/phase2_s", "time/resample_s", "time/phase3_s")


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_eos_cell_logs_a_finished_run_with_every_metric_and_artifact(mlflow_store, tiny_config):
    result = run_cell(tiny_config(), progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for name in SUMMARY_METRICS:
        assert math.isfinite(run.data.metrics[name]), name
    assert all(f"class/recall_{c}" in run.data.metrics for c in range(10))
    assert 0 <= run.data.metrics["test/bac"] <= 1
    # Per-epoch curves of both trained phases.
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "phase1/val_bac")) == 2
    assert len(client.get_metric_history(run.info.run_id, "phase3/val_bac")) == 2
    assert run.data.params["method"] == "eos" and run.data.params["dataset"] == "digits"
    assert run.data.tags["code_version"] and run.data.tags["phase1_key"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "phase1")}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "results")}
    assert {"phase1/model.pt", "phase1/embeddings.npz", "results/per_class.csv",
            "results/confusion_matrix.png", "results/head.pt",
            "results/resampled_train.npz"} <= artifacts
    # The exact training subset is a dataset input whose digest identifies it.
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == run.data.params["subset_digest"]


def test_post_hoc_methods_reuse_the_trained_extractor(mlflow_store, tiny_config):
    first = run_cell(tiny_config(method="eos"), progress=False)
    second = run_cell(tiny_config(method="smote"), progress=False)
    plain = run_cell(tiny_config(method="none"), progress=False)
    assert not first["phase1_reused"]
    assert second["phase1_reused"] and second["phase1_run_id"] == first["run_id"]
    assert plain["phase1_run_id"] == first["run_id"]
    assert mlflow.get_run(second["run_id"]).data.tags["phase1_run_id"] == first["run_id"]
    # Another training seed is another phase 1.
    other = run_cell(tiny_config(method="smote", seed=1), progress=False)
    assert not other["phase1_reused"]


def test_same_configuration_and_seed_give_identical_metrics(mlflow_store, tiny_config):
    a = run_cell(tiny_config(), reuse_phase1=False, progress=False)["metrics"]
    b = run_cell(tiny_config(), reuse_phase1=False, progress=False)["metrics"]
    for name, value in a.items():
        if not name.startswith("time/"):
            assert b[name] == value, name


def test_diverging_run_ends_failed_with_the_reason(mlflow_store, tiny_config):
    with pytest.raises(DivergenceError):
        run_cell(tiny_config(method="none", lr=1e12), progress=False)
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["failure_reason"]


def test_interrupted_run_ends_killed(mlflow_store, tiny_config, monkeypatch):
    import benchmark.pipeline as pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "retrain_head", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_cell(tiny_config(), progress=False)
    (run,) = all_runs()
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("overrides, message", [
    ({"method": "eso"}, "unknown method 'eso'"),
    ({"dataset": "cifar"}, "unknown dataset"),
    ({"epochs": 0}, "epochs must be positive"),
    ({"method_params": {"k_neighbors": -3}}, "k_neighbors' parameter of EOS must be an int"),
    ({"ratio": 0.5}, "at least 1"),
    ({"ratio": 1000}, "empty"),
    ({"method": "none", "method_params": {"k_neighbors": 5}}, "takes no parameter"),
    ({"backbone_params": {"depth": 3}}, "takes no parameter"),
    ({"loss": "focal", "loss_params": {"gama": 1}}, "gama"),
    ({"loss": "focal", "loss_params": {"gamma": -1}}, "non-negative"),
])
def test_bad_input_stops_before_any_run(mlflow_store, tiny_config, overrides, message):
    with pytest.raises(UserError, match=message):
        run_cell(tiny_config(**overrides), progress=False)
    assert all_runs() == []


def test_final_gap_uses_the_resampled_embeddings(mlflow_store, tiny_config, tmp_path):
    from benchmark.metrics import generalization_gap

    result = run_cell(tiny_config(), progress=False)
    client = mlflow.MlflowClient()
    folder = client.download_artifacts(result["run_id"], "", str(tmp_path))
    with np.load(f"{folder}/results/resampled_train.npz") as resampled, \
            np.load(f"{folder}/phase1/embeddings.npz") as emb:
        gap, _ = generalization_gap(resampled["x"], resampled["y"], emb["test_x"],
                                    emb["test_y"], 10)
        assert np.bincount(resampled["y"]).min() == np.bincount(resampled["y"]).max()
    assert result["metrics"]["gap/overall"] == pytest.approx(gap)


def test_user_set_loss_parameters_name_the_loss(mlflow_store, tiny_config):
    result = run_cell(tiny_config(loss="focal", loss_params={"gamma": 1}, method="none"),
                      progress=False)
    params = mlflow.get_run(result["run_id"]).data.params
    assert params["loss.gamma"] == "1" and params["loss_hparam.gamma"] == "1"
    plain = run_cell(tiny_config(loss="focal", method="none"), progress=False)
    params = mlflow.get_run(plain["run_id"]).data.params
    assert "loss.gamma" not in params and params["loss_hparam.gamma"] == "2.0"


def write_noise_tree(root, seed, classes=("cat", "dog", "owl"), per_class=12):
    """Class folders of random 16x16 PNGs; another seed is other data with the same classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            pixels[..., c] = 255  # each class leans to one colour: learnable
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_folders_with_the_same_classes_never_share_a_phase1(mlflow_store, tiny_config, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_noise_tree(first, seed=1)
    write_noise_tree(second, seed=2)
    make = lambda root: tiny_config(dataset="folder", data_root=str(root), method="smote",
                                    epochs=1, head_epochs=1, image_size=16)
    a = run_cell(make(first), progress=False)
    b = run_cell(make(second), progress=False)
    assert not b["phase1_reused"] and b["phase1_run_id"] != a["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'fresh.db'}")
    fresh = run_cell(make(second), progress=False)
    for name, value in fresh["metrics"].items():
        if not name.startswith("time/"):
            assert b["metrics"][name] == value, name


def test_a_cached_phase1_that_does_not_fit_the_cell_is_refused(mlflow_store, tiny_config,
                                                              monkeypatch):
    from benchmark import tracking

    first = run_cell(tiny_config(method="none", epochs=1), progress=False)
    # A store that hands out the wrong phase 1 (another profile: other class counts).
    monkeypatch.setattr(tracking, "find_phase1_run", lambda key: first["run_id"])
    with pytest.raises(UserError, match=f"cached phase 1 of run {first['run_id']} does not "
                                        f"match this cell.*train_class_counts"):
        run_cell(tiny_config(method="none", epochs=1, ratio=5), progress=False)
    assert len(all_runs()) == 1
