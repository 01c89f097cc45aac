"""The generated 'fake' dataset: shapes, exact class counts, FakeData's images, determinism."""
import numpy as np
import pytest
import torch

from benchmark.data.fake import SEED_STRIDE, Fake
from benchmark.errors import UserError
from benchmark.registry import DATASETS

SMALL = {"classes": 4, "train_per_class": 6, "test_per_class": 3, "image_size": 8}


def test_default_is_cifar_shaped():
    source = DATASETS.create("fake")
    assert source.params == {"classes": 10, "train_per_class": 5000, "test_per_class": 1000,
                             "image_size": 32, "channels": 3, "seed": 0}
    assert (source.defaults.image_size, source.defaults.ratio, source.defaults.hflip) == (
        32, 100, True)


def test_shapes_and_exact_counts_per_class():
    train, test = Fake(**SMALL).load()
    assert train.images.shape == (24, 3, 8, 8) and test.images.shape == (12, 3, 8, 8)
    assert train.images.dtype == torch.uint8 and train.classes == ["0", "1", "2", "3"]
    assert torch.bincount(train.labels).tolist() == [6] * 4
    assert torch.bincount(test.labels).tolist() == [3] * 4
    assert len(torch.unique(train.images.flatten(1), dim=0)) == 24  # noise: all different


def test_images_and_labels_are_torchvisions_fakedata():
    from torchvision.datasets import FakeData

    seed = 2
    train, _ = Fake(**SMALL, channels=1, seed=seed).load()
    fake = FakeData(size=10, image_size=(1, 8, 8), num_classes=4,
                    random_offset=seed * SEED_STRIDE, transform=np.asarray)
    # The first images of the stream all train (no class can be full yet).
    for i in range(3):
        image, label = fake[i]
        assert np.array_equal(train.images[i, 0].numpy(), image) and train.labels[i] == label


def test_same_parameters_same_data_other_seed_other_data():
    first, again, other = (Fake(**SMALL, seed=s).load()[0] for s in (0, 0, 1))
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


def test_identity_names_parameters_and_seed():
    base = Fake(**SMALL).identity()
    assert base == Fake(**SMALL).identity()
    assert base["params"]["seed"] == 0 and base["data"]["generator"].endswith("FakeData")
    for change in ({"seed": 1}, {"classes": 5}, {"image_size": 16}, {"train_per_class": 7}):
        assert Fake(**{**SMALL, **change}).identity() != base
    assert Fake(image_size=16).defaults.image_size == 16
    assert Fake.defaults.image_size == 32


@pytest.mark.parametrize("bad", [{"classes": 0}, {"image_size": 2.5}, {"seed": -1}, {"seed": 256},
                                 {"train_per_class": True}])
def test_bad_sizes_are_user_errors(bad):
    with pytest.raises(UserError, match="dataset 'fake'"):
        Fake(**bad)
