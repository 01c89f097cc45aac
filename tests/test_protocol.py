"""The protocol: a balanced validation set from unused pool images, phase-3 recipes, logged settings."""
import mlflow
import numpy as np
import pytest
import torch

from benchmark import tracking

from benchmark.config import RunConfig
from benchmark.data.profiles import (balanced_validation, choose_validation, draw_per_class,
                                     profile_counts)
from benchmark.errors import UserError
from benchmark.pipeline import prepare_data, run_cell

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def cifar_shaped_pool():
    return np.repeat(np.arange(10), 5000)


def test_cifar10_at_ratio_100_trains_on_the_profile_but_the_head_class():
    labels = cifar_shaped_pool()
    counts = profile_counts("exp", [5000] * 10, 100)
    assert counts == CIFAR10_LT_100
    subset = draw_per_class(labels, counts, seed=0)
    train, val = balanced_validation(labels, subset, per_class=20, seed=0)
    assert np.bincount(labels[train], minlength=10).tolist() == [4980] + CIFAR10_LT_100[1:]
    assert np.bincount(labels[val], minlength=10).tolist() == [20] * 10
    assert not set(train) & set(val)
    assert set(train) <= set(subset)
    # Only the head class gives validation images out of its subset.
    from_subset = np.intersect1d(val, subset)
    assert set(labels[from_subset]) == {0} and len(from_subset) == 20
    assert choose_validation(labels, subset, 20) == ("balanced", "")


def test_the_validation_draw_depends_on_the_subset_seed_only():
    labels = cifar_shaped_pool()
    subset = draw_per_class(labels, CIFAR10_LT_100, seed=3)
    first = balanced_validation(labels, subset, 20, seed=3)
    again = balanced_validation(labels, subset, 20, seed=3)
    other = balanced_validation(labels, subset, 20, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_a_pool_with_nothing_to_spare_falls_back_to_a_fraction_and_says_why():
    labels = np.repeat(np.arange(3), [50, 30, 10])
    natural = np.arange(len(labels))  # the natural profile uses every image
    mode, why = choose_validation(labels, natural, 20)
    assert mode == "fraction" and "none is left" in why
    starved = draw_per_class(labels, [10, 10, 10], seed=0)  # class 2 has no spare image
    mode, why = choose_validation(labels, starved, 20)
    assert mode == "fraction" and "class 2 would give 20 of its 10" in why
    with pytest.raises(UserError, match="too few for 20 validation images"):
        balanced_validation(labels, starved, 20, seed=0)


def test_digits_validation_is_balanced_and_never_touches_train_or_test():
    cfg = RunConfig(dataset="digits").resolved()
    data = prepare_data(cfg)
    assert data.validation == "balanced"
    assert data.val_class_counts == [cfg.val_per_class] * 10
    assert not set(data.train_indices) & set(data.val_indices)
    # Only the head class (which the profile leaves few spare images) trains on fewer
    # images than its profile count, and only by what the pool could not supply.
    from benchmark.data.profiles import validation_shortfall
    from benchmark.pipeline import load_dataset

    pool, _ = load_dataset("digits", None, False)
    labels = pool.labels.numpy()
    subset = draw_per_class(labels, data.profile_counts, seed=cfg.subset_seed)
    assert set(data.train_indices) <= set(subset)
    shortfall = validation_shortfall(labels, subset, cfg.val_per_class)
    assert shortfall[0] > 0 and shortfall[1:] == [0] * 9
    assert data.class_counts == [n - s for n, s in zip(data.profile_counts, shortfall)]


def test_every_seed_and_method_of_a_cell_validates_on_the_same_images(mlflow_store, tiny_config):
    first = run_cell(tiny_config(method="none", epochs=1, head_epochs=1), progress=False)
    second = run_cell(tiny_config(method="smote", seed=1, epochs=1, head_epochs=1),
                      progress=False)
    params = [mlflow.get_run(r["run_id"]).data.params for r in (first, second)]
    assert params[0]["val_fingerprint"] == params[1]["val_fingerprint"]
    assert params[0]["val_class_counts"] == "[20, 20, 20, 20, 20, 20, 20, 20, 20, 20]"
    assert params[0]["validation_used"] == "balanced"


def test_defaults_of_the_method_loss_and_backbone_are_logged(mlflow_store, tiny_config):
    result = run_cell(tiny_config(epochs=1, head_epochs=1, backbone="wrn28",
                                  loss="focal"), progress=False)
    params = mlflow.get_run(result["run_id"]).data.params
    assert params["method_hparam.k_neighbors"] == "10"
    assert params["method_hparam.max_step"] == "1.0"
    assert params["loss_hparam.gamma"] == "2.0"
    assert params["backbone_hparam.widen_factor"] == "3"


def test_reference_head_recipe_warms_up_from_a_fresh_head(mlflow_store, tiny_config):
    schedule = tiny_config(head_recipe="reference", head_epochs=10).head_schedule
    assert [schedule.lr_at(e) for e in range(6)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert tiny_config(head_epochs=10).head_schedule.lr_at(0) == 0.1
    result = run_cell(tiny_config(epochs=1, head_epochs=2, head_recipe="reference"),
                      progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["head_recipe"] == "reference"
    plain = run_cell(tiny_config(epochs=1, head_epochs=2), progress=False)
    assert plain["phase1_run_id"] == result["phase1_run_id"]  # the recipe is phase 3 only
    heads = [torch.load(tracking.download_artifacts(r["run_id"], "results") / "head.pt",
                        weights_only=True)["weight"] for r in (plain, result)]
    assert not torch.equal(*heads)
