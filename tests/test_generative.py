"""Tests of the generative over-samplers (cgan, bagan, gamo, deepsmote) with tiny trainings."""
import dataclasses
import math

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
    real = smooth_images(8, 1, counts=[30, 30])
    same = generative.frechet_per_class(real, real)
    assert all(abs(d) < 1e-6 for d in same.values())
    other = ImageSet(255 - real.images, real.labels, real.classes)
    assert all(d > 1e-3 for d in generative.frechet_per_class(real, other).values())


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
    assert {"training_set/samples.png", "training_set/frechet.png",
            "training_set/generator.pt"} <= files
    assert [m.step for m in client.get_metric_history(run.info.run_id, "generator/g_loss")] == [0]
    assert "generator/frechet_mean" in run.data.metrics

    # A second training seed reuses the generator: figures again, no losses, names its source.
    again = client.get_run(run_cell(dataclasses.replace(cfg, seed=1), progress=False)["run_id"])
    assert again.data.tags["training_set_run_id"] == run.info.run_id
    assert "generator/g_loss" not in again.data.metrics
    files = {f.path for f in client.list_artifacts(again.info.run_id, "training_set")}
    assert {"training_set/samples.png", "training_set/frechet.png"} <= files
    assert "training_set/generator.pt" not in files


def test_generation_in_chunks_keeps_counts(monkeypatch):
    monkeypatch.setattr(generative, "GENERATE_CHUNK", 4)
    train = smooth_images(8, 1)
    for name in ("cgan", "gamo"):
        synthetic = tiny(name).generate(train, seed=0)
        assert torch.bincount(synthetic.labels, minlength=3).tolist() == [0, 14, 17]
        assert len(synthetic.images) == 31
