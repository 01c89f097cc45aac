"""Tests of the generative over-samplers (cgan, bagan, gamo, deepsmote) with tiny trainings."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines import generative
from benchmark.config import RunConfig
from benchmark.data import ImageSet
from benchmark.errors import DivergenceError, UserError
from benchmark.methods import make_method

# Tiny networks, two epochs, learning rates high enough that two epochs learn something.
TINY = {"cgan": {"lr": 1e-2}, "gamo": {}, "deepsmote": {"ae_lr": 1e-2},
        "bagan": {"lr": 1e-2, "ae_lr": 1e-2, "ae_epochs": 2}}
COUNTS = [20, 6, 3]


def tiny(name: str, **overrides):
    method = make_method(name, {"epochs": 2, "batch_size": 8, "width": 8, "latent": 16,
                                **TINY[name], **overrides})
    method.validate()
    return method


def smooth_images(size: int, channels: int, counts=COUNTS, seed: int = 0) -> ImageSet:
    """Low-frequency random images (upsampled 4x4 noise): structure an autoencoder can learn."""
    rng = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    low = torch.rand(len(labels), channels, 4, 4, generator=rng)
    images = (F.interpolate(low, size=(size, size), mode="bilinear") * 255).to(torch.uint8)
    return ImageSet(images, labels, [f"class{c}" for c in range(len(counts))])


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("size", [8, 28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generated_shape_range_and_counts(name, size, channels):
    train = smooth_images(size, channels)
    method = tiny(name)
    synthetic = method.generate(train, seed=0)
    assert synthetic.images.dtype == torch.uint8
    assert synthetic.images.shape[1:] == (channels, size, size)
    # every class brought to n_max, the largest class untouched
    total = torch.bincount(torch.cat([train.labels, synthetic.labels]), minlength=3)
    assert total.tolist() == [max(COUNTS)] * 3
    assert len(method.history) >= 2 and all(math.isfinite(v) for epoch in method.history
                                            for v in epoch.values())


def test_same_seed_same_images_and_global_rng_untouched():
    train = smooth_images(8, 1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = tiny("cgan").generate(train, seed=3)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert torch.equal(first.images, tiny("cgan").generate(train, seed=3).images)


def test_class_smaller_than_batch_trains():
    train = smooth_images(8, 1, counts=[40, 2])
    synthetic = tiny("bagan", batch_size=32).generate(train, seed=0)
    assert torch.bincount(synthetic.labels, minlength=2).tolist() == [0, 38]


def test_auto_scale_rule():
    method = make_method("bagan")
    small, paper = method.resolved(5000), method.resolved(12406)
    assert (small["epochs"], small["batch_size"]) == (generative.SMALL_EPOCHS,
                                                      generative.SMALL_BATCH)
    assert (paper["epochs"], paper["batch_size"], paper["lr"]) == (generative.PAPER_EPOCHS,
                                                                   128, 5e-5)
    assert make_method("gamo").resolved(20000)["batch_size"] == 32


def test_nonfinite_loss_raises_divergence():
    train = smooth_images(8, 1)
    method = tiny("cgan", lr=1e30)  # overflows the weights within an epoch or two
    with pytest.raises(DivergenceError, match="diverged at epoch 1 .non-finite"):
        method.generate(train, seed=0)


def test_mode_collapse_raises_divergence():
    images = torch.full((4, 1, 8, 8), 7, dtype=torch.uint8)
    with pytest.raises(DivergenceError, match="mode collapse.*'b'"):
        generative.check_collapse("cgan", images, torch.tensor([1, 1, 1, 1]), ["a", "b"])
    varied = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    generative.check_collapse("cgan", varied, torch.tensor([1, 1, 1, 1]), ["a", "b"])


def test_single_image_class_refused_by_neighbour_methods():
    with pytest.raises(UserError, match="at least 2"):
        make_method("deepsmote").adapt([10, 1])
    assert make_method("cgan").adapt([10, 1]) == []


def test_stage_key_follows_generator_parameters():
    def key(**params):
        return RunConfig(dataset="digits", method="cgan", method_params=params
                         ).resolved().training_set_key()

    assert key(width=16) != key(width=32)
    assert key() == key(width=32)  # the default spelled out is the same generator
    assert key() != RunConfig(dataset="digits", method="bagan").resolved().training_set_key()
    seeds = [RunConfig(dataset="digits", method="cgan", seed=s).resolved().training_set_key()
             for s in (0, 1)]
    assert seeds[0] == seeds[1]  # a second training seed reuses the generator


def test_frechet_is_zero_for_identical_sets_and_grows_with_difference():
    rng = np.random.default_rng(0)
    real, labels = rng.normal(size=(60, 8)), np.repeat([0, 1], 30)
    same = generative.frechet_per_class(real, labels, real, labels, 2)
    assert sorted(same) == [0, 1] and all(abs(d) < 1e-6 for d in same.values())
    shifted = generative.frechet_per_class(real, labels, real + 1.0, labels, 2)
    assert all(d == pytest.approx(8.0, rel=1e-6) for d in shifted.values())  # |mean shift|^2
    # Fewer rows than dimensions (a rare class): singular covariances, still a finite figure.
    few = generative.frechet_per_class(real[:3], labels[:3] * 0, real[3:6], labels[:3] * 0, 2)
    assert list(few) == [0] and math.isfinite(few[0])


def test_frechet_switch_is_no_part_of_the_generator_key():
    def key(**params):
        return RunConfig(dataset="digits", method="gamo", method_params=params
                         ).resolved().training_set_key()

    assert key(frechet=False) == key() and key(width=16) != key()
    with pytest.raises(UserError, match="frechet"):
        RunConfig(dataset="digits", method="gamo", method_params={"frechet": "no"}).resolved()


def runs_of(client, **tags):
    import mlflow

    found = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def test_run_cell_end_to_end(mlflow_store, tiny_config):
    import mlflow

    from benchmark.pipeline import run_cell

    cfg = tiny_config(method="cgan", method_params={"epochs": 1, "width": 8, "latent": 16},
                      epochs=1, head_epochs=1)
    result = run_cell(cfg, progress=False)
    client = mlflow.MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "training_set")}
    assert {"training_set/samples.png", "training_set/frechet.png", "training_set/frechet.json",
            "training_set/generator.pt", "training_set/generator.json"} <= files
    assert [m.step for m in client.get_metric_history(run.info.run_id, "generator/g_loss")] == [0]
    metrics = run.data.metrics
    # The generator's seconds are a stage of their own, out of the training-set stage's.
    assert metrics["time/generator_s"] > 0 and metrics["time/training_set_s"] < \
        metrics["time/generator_s"]
    # The Frechet figure, per class and its mean, in the none model's embedding: that model
    # was trained for it (a nested run of the none cell) and a later none run reuses it.
    per_class = [metrics[f"class/frechet_{c}"] for c in range(10) if f"class/frechet_{c}" in
                 metrics]
    assert len(per_class) == 9  # every class but the largest got images
    assert metrics["generator/frechet_mean"] == pytest.approx(np.mean(per_class))
    (plain,) = runs_of(client, method="none")
    assert run.data.tags["frechet_phase1_run_id"] == plain.info.run_id
    assert plain.data.tags["made_for_run"] == run.info.run_id
    assert plain.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert plain.info.status == "FINISHED" and plain.data.tags["phase1_complete"] == "true"
    later = run_cell(dataclasses.replace(cfg, method="none", method_params={}), progress=False)
    assert later["phase1_reused"] and later["phase1_run_id"] == plain.info.run_id

    # A second training seed reuses the generator: its recorded time, no losses, the figures
    # again, and it names its source; a none model of its own seed embeds its images.
    again_result = run_cell(dataclasses.replace(cfg, seed=1), progress=False)
    again = client.get_run(again_result["run_id"])
    assert again.data.tags["training_set_run_id"] == run.info.run_id
    assert again.data.metrics["time/generator_s"] == metrics["time/generator_s"]
    assert "Training set (generator, training_set) reused from [run " \
        f"{run.info.run_id}]" in again.data.tags["mlflow.note.content"]
    assert "generator/g_loss" not in again.data.metrics
    files = {f.path for f in client.list_artifacts(again.info.run_id, "training_set")}
    assert {"training_set/samples.png", "training_set/frechet.png"} <= files
    assert "training_set/generator.pt" not in files
    assert len(runs_of(client, method="none")) == 3  # the later one and seed 1's

    # The same cell again reuses its whole phase 1, and with it the stage times.
    third = run_cell(cfg, progress=False)
    assert third["phase1_reused"]
    assert third["metrics"]["time/generator_s"] == metrics["time/generator_s"]


def test_frechet_switched_off_trains_no_none_model(mlflow_store, tiny_config):
    import mlflow

    from benchmark.pipeline import run_cell

    cfg = tiny_config(method="deepsmote", epochs=1, head_epochs=1,
                      method_params={"epochs": 1, "width": 8, "latent": 16, "frechet": False})
    run = mlflow.get_run(run_cell(cfg, progress=False)["run_id"])
    assert run.info.status == "FINISHED" and "generator/frechet_mean" not in run.data.metrics
    assert "time/generator_s" in run.data.metrics
    assert runs_of(mlflow.MlflowClient(), method="none") == []


def test_diverging_generator_ends_the_run_failed_with_the_reason(mlflow_store, tiny_config):
    import mlflow

    from benchmark.pipeline import run_cell

    cfg = tiny_config(method="cgan", epochs=1, head_epochs=1,
                      method_params={"epochs": 2, "width": 8, "latent": 16, "lr": 1e30})
    with pytest.raises(DivergenceError, match="diverged"):
        run_cell(cfg, progress=False)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["method"] == "cgan"
    assert run.data.tags["failure_reason"].startswith(
        "DivergenceError: method 'cgan': the generator's training diverged at epoch 1")
    assert "training_set_complete" not in run.data.tags  # nothing cached for a later run


def test_mode_collapse_ends_the_run_failed_with_the_reason(mlflow_store, tiny_config,
                                                           monkeypatch):
    import mlflow

    from benchmark.pipeline import run_cell

    # A generator that makes one image over and over.
    monkeypatch.setattr(generative.ConditionalGAN, "train_and_generate",
                        lambda self, x, labels, num_classes, wanted, rng, channels:
                        torch.zeros(len(wanted), *x.shape[1:]))
    with pytest.raises(DivergenceError, match="mode collapse"):
        run_cell(tiny_config(method="cgan", epochs=1), progress=False)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    assert "mode collapse" in run.data.tags["failure_reason"]


def test_generation_in_chunks_keeps_counts(monkeypatch):
    monkeypatch.setattr(generative, "GENERATE_CHUNK", 4)
    train = smooth_images(8, 1)
    for name in ("cgan", "gamo"):
        synthetic = tiny(name).generate(train, seed=0)
        assert torch.bincount(synthetic.labels, minlength=3).tolist() == [0, 14, 17]
        assert len(synthetic.images) == 31
