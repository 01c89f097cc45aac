"""The method lifecycle: pixel-space samplers, mixup and Remix end to end, stage keys, hooks."""
import math

import mlflow
import pytest
import torch

from benchmark import tracking
from benchmark.errors import UserError
from benchmark.losses import CrossEntropy
from benchmark.methods import Method, make_method
from benchmark.pipeline import run_cell
from benchmark.registry import METHODS


def artifacts(run_id, folder):
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}


@pytest.mark.parametrize("method, loss", [("pre-smote", "ce"), ("pre-eos", "ce"),
                                          ("pre-bsmote", "ce"), ("pre-balsvm", "ce"),
                                          ("remix", "ce-drw"), ("mixup", "ce")])
def test_methods_that_change_phase1_finish_with_their_own_phase1(mlflow_store, tiny_config,
                                                                  method, loss):
    plain = run_cell(tiny_config(method="none", loss=loss, epochs=1, head_epochs=1),
                     progress=False)
    result = run_cell(tiny_config(method=method, loss=loss, epochs=1, head_epochs=1),
                      progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["test/bac"])
    assert run.data.tags["phase1_key"] != mlflow.get_run(plain["run_id"]).data.tags["phase1_key"]
    assert not result["phase1_reused"]
    if method.startswith("pre-"):
        assert {"training_set/samples.png", "training_set/synthetic.npz"} <= artifacts(
            result["run_id"], "training_set")
        assert "time/training_set_s" in run.data.metrics
        synthetic = eval(run.data.params["train_synthetic_counts"])  # a JSON list
        counts = eval(run.data.params["train_class_counts"])
        totals = [n + s for n, s in zip(counts, synthetic)]
        if method in ("pre-smote", "pre-eos"):
            assert totals == [max(counts)] * len(counts)
        else:  # borderline and SVM variants add only where they find borderline points
            assert sum(synthetic) > 0 and max(totals) == max(counts) and min(synthetic) >= 0
        assert "phase3/val_bac" not in run.data.metrics  # no phase 3: the plain head


def test_a_second_training_seed_reuses_the_pixel_resampling(mlflow_store, tiny_config):
    first = run_cell(tiny_config(method="pre-smote", epochs=1), progress=False)
    second = run_cell(tiny_config(method="pre-smote", epochs=1, seed=1), progress=False)
    tags = mlflow.get_run(second["run_id"]).data.tags
    assert tags["training_set_run_id"] == first["run_id"]
    assert "training_set_complete" not in tags
    assert artifacts(second["run_id"], "training_set") == {"training_set/samples.png"}
    assert not second["phase1_reused"]  # another seed is another phase 1


def test_mixed_loss_is_the_label_weighted_sum():
    loss = CrossEntropy([10, 5, 1])
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    a, b = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 0, 1, 0, 1])
    lam = torch.tensor(0.3)
    expected = 0.3 * loss(logits, a) + 0.7 * loss(logits, b)
    assert torch.allclose(loss.mixed(logits, a, b, lam), expected)
    ones = loss.mixed(logits, a, b, torch.ones(6))
    assert torch.allclose(ones, loss(logits, a))


def test_a_hook_override_joins_its_stage_key_without_being_told():
    class Doubling(Method):
        defaults = {"factor": 2}

        def train_step(self, cell):
            return super().train_step(cell)

    plain = make_method("none")
    assert plain.stage_identity("phase1") == {} and plain.stage_identity("training_set") == {}
    doubling = Doubling(factor=3)
    identity = doubling.stage_identity("phase1")
    assert identity["hyperparameters"] == {"factor": 3} and "Doubling" in identity["class"]
    assert doubling.stage_identity("training_set") == {}
    assert make_method("eos").stage_identity("phase1") == {}  # post-hoc: shares phase 1


def test_hooks_are_called_for_every_cell(mlflow_store, tiny_config, monkeypatch):
    calls = []

    class Recording(Method):
        """Records every hook the pipeline calls."""

        def on_epoch_end(self, cell, phase, epoch, record):
            calls.append((phase, epoch))

        def phase2_outputs(self, cell, phase1):
            calls.append("phase2")
            return {}

        def on_cell_end(self, cell, results):
            calls.append(("end", sorted(results["metrics"])[0]))

    monkeypatch.setitem(METHODS._entries, "recording", (Recording, "records hooks"))
    run_cell(tiny_config(method="recording", epochs=2), progress=False)
    assert calls == [("phase1", 1), ("phase1", 2), "phase2", ("end", "class/gap_0")]


def test_stage_timings_name_every_stage_the_run_logged(mlflow_store, tiny_config):
    result = run_cell(tiny_config(method="pre-eos", epochs=1), progress=False)
    metrics = mlflow.get_run(result["run_id"]).data.metrics
    stages = {k for k in metrics if k.startswith("time/")}
    assert {"time/training_set_s", "time/phase1_s", "time/phase2_s", "time/wall_s"} <= stages
    assert tracking.find_stage_run("training_set",
                                   mlflow.get_run(result["run_id"]).data.tags[
                                       "training_set_key"]) == result["run_id"]


class TimedSubStage(Method):
    """A training-set stage that spends 0.3 s, 0.25 s of them in a sub-stage it times."""

    def prepare_training_set(self, cell, train):
        import time

        time.sleep(0.3)
        cell.timings["slow_part"] = 0.25
        return train


def test_a_sub_stage_is_carved_out_of_the_training_set_time_and_reused_as_recorded(
        mlflow_store, tiny_config, monkeypatch):
    monkeypatch.setitem(METHODS._entries, "timed", (TimedSubStage, "times a sub-stage"))
    first_id = run_cell(tiny_config(method="timed", epochs=1), progress=False)["run_id"]
    first = mlflow.get_run(first_id).data.metrics
    assert first["time/slow_part_s"] == 0.25
    assert 0.0 <= first["time/training_set_s"] < 0.25  # the rest of the 0.3 s, counted once
    again = mlflow.get_run(run_cell(tiny_config(method="timed", epochs=1, seed=1),
                                    progress=False)["run_id"]).data
    assert again.tags["training_set_run_id"] == first_id  # reused, with its recorded times
    assert again.metrics["time/slow_part_s"] == 0.25
    assert again.metrics["time/training_set_s"] == first["time/training_set_s"]


def test_a_user_mistake_met_inside_the_run_leaves_no_run(mlflow_store, tiny_config, monkeypatch):
    class Refusing(Method):
        def prepare_training_set(self, cell, train):
            raise UserError("method 'refusing' cannot over-sample this training set")

    monkeypatch.setitem(METHODS._entries, "refusing", (Refusing, "refuses"))
    with pytest.raises(UserError, match="cannot over-sample"):
        run_cell(tiny_config(method="refusing"), progress=False)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
