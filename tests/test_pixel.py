"""Pixel-space over-sampling: originals kept first, uint8 round trip, balance, sample grid PNG."""
import numpy as np
import pytest
import torch
from imblearn.over_sampling import SMOTE, SVMSMOTE, BorderlineSMOTE

from baselines.pixel import FitOnceSVC, plot_sample_grid, resample_images, synthetic_counts
from benchmark.eos import EOS

COUNTS = [40, 15, 8]


def image_set(counts=COUNTS, channels=3, size=4, seed=0):
    """Overlapping classes: a per-class mean image plus noise, clipped to uint8."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(70, 180, (len(counts), channels, size, size))
    labels = np.repeat(np.arange(len(counts)), counts)
    images = means[labels] + rng.normal(0, 45, (len(labels), channels, size, size))
    return (torch.from_numpy(np.clip(np.rint(images), 0, 255).astype(np.uint8)),
            torch.from_numpy(labels))


SAMPLERS = {
    "smote": lambda: SMOTE(k_neighbors=5, random_state=0),
    "bsmote": lambda: BorderlineSMOTE(random_state=0),
    "svmsmote": lambda: SVMSMOTE(random_state=0),
    "eos": lambda: EOS(k_neighbors=10, random_state=0),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_originals_come_first_unchanged_then_uint8_synthetic_images(name):
    images, labels = image_set()
    out_images, out_labels = resample_images(images.clone(), labels.clone(), SAMPLERS[name]())
    n = len(images)
    assert out_images.dtype == torch.uint8 and out_images.shape[1:] == images.shape[1:]
    assert out_labels.dtype == torch.int64 and len(out_labels) == len(out_images)
    assert torch.equal(out_images[:n], images) and torch.equal(out_labels[:n], labels)
    added = out_labels[n:]
    assert len(added) > 0 and set(added.tolist()) <= {1, 2}
    # Every over-sampler here brings classes up to the majority at most.
    assert max(torch.bincount(out_labels).tolist()) == max(COUNTS)


def test_fit_once_svc_gives_svmsmote_the_same_output_with_one_fit(monkeypatch):
    from sklearn.svm._base import BaseLibSVM

    fits = []
    original_fit = BaseLibSVM.fit

    def counted_fit(self, X, y, sample_weight=None):
        fits.append(type(self).__name__)
        return original_fit(self, X, y, sample_weight)

    monkeypatch.setattr(BaseLibSVM, "fit", counted_fit)
    images, labels = image_set(counts=[40, 15, 12, 10])
    default = resample_images(images, labels, SVMSMOTE(random_state=0))
    once = resample_images(images, labels, SVMSMOTE(
        random_state=0, svm_estimator=FitOnceSVC(gamma="scale", random_state=0)))
    assert fits == ["SVC"] * 3 + ["FitOnceSVC"]
    assert torch.equal(default[0], once[0]) and torch.equal(default[1], once[1])
    # New arrays, or new values in a copy, are fitted again.
    svc = FitOnceSVC(gamma="scale")
    X, y = images.reshape(len(images), -1).float().numpy(), labels.numpy()
    svc.fit(X, y).fit(X, y).fit(X.copy(), y).fit(X, y, sample_weight=np.ones(len(y))).fit(X, y)
    assert fits[4:] == ["FitOnceSVC"] * 4


def test_samplers_are_handed_float32():
    seen = {}

    class Spy(SMOTE):
        def fit_resample(self, X, y):
            seen["dtype"], seen["shape"] = X.dtype, X.shape
            return super().fit_resample(X, y)

    images, labels = image_set()
    resample_images(images, labels, Spy(random_state=0))
    assert seen == {"dtype": np.float32, "shape": (sum(COUNTS), 3 * 4 * 4)}


def test_smote_balances_every_class_and_stays_inside_the_class_pixel_range():
    images, labels = image_set(channels=1, size=5)
    out_images, out_labels = resample_images(images, labels, SMOTE(k_neighbors=5, random_state=1))
    assert torch.bincount(out_labels).tolist() == [max(COUNTS)] * len(COUNTS)
    assert synthetic_counts(labels, out_labels, 3) == [0, 25, 32]
    n = len(images)
    for klass in (1, 2):
        real = images[labels == klass].int()
        synthetic = out_images[n:][out_labels[n:] == klass].int()
        # SMOTE interpolates between two members of the class: per pixel, within their range.
        assert (synthetic >= real.min(dim=0).values).all()
        assert (synthetic <= real.max(dim=0).values).all()
        # ... and they are new points, not copies.
        assert not any(torch.equal(s, r) for s in synthetic[:5] for r in real)


class FixedOutput:
    """A stand-in sampler returning the originals (optionally reordered) and set new rows."""

    def __init__(self, new_rows, new_labels, order=None):
        self.new_rows = np.asarray(new_rows, dtype=np.float32)
        self.new_labels = np.asarray(new_labels)
        self.order = order

    def fit_resample(self, X, y):
        X_res = np.vstack([X, self.new_rows])
        y_res = np.concatenate([y, self.new_labels])
        if self.order is not None:
            X_res, y_res = X_res[self.order], y_res[self.order]
        return X_res, y_res


def test_synthetic_pixels_are_rounded_and_clipped_to_uint8():
    images = torch.zeros(2, 1, 1, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    sampler = FixedOutput([[-3.2, 255.7, 12.5, 13.5], [0.49, 254.51, 300.0, -0.0]], [1, 1])
    out_images, out_labels = resample_images(images, labels, sampler)
    assert out_images[2:].flatten().tolist() == [0, 255, 12, 14, 0, 255, 255, 0]
    assert out_labels.tolist() == [0, 1, 1, 1]


def test_non_finite_synthetic_pixels_are_refused():
    images, labels = torch.zeros(2, 1, 1, 2, dtype=torch.uint8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="non-finite"):
        resample_images(images, labels, FixedOutput([[np.nan, 1.0]], [1]))


def test_a_sampler_that_reorders_is_handled():
    images, labels = image_set(counts=[5, 2], size=2)
    new_rows = [[7.25] * 12, images[0].flatten().float().tolist()]  # a duplicate of image 0
    order = np.random.default_rng(0).permutation(len(images) + 2)
    out_images, out_labels = resample_images(images, labels,
                                             FixedOutput(new_rows, [1, 0], order=order))
    n = len(images)
    assert torch.equal(out_images[:n], images) and torch.equal(out_labels[:n], labels)
    assert sorted(out_labels[n:].tolist()) == [0, 1]
    added = {tuple(image.flatten().tolist()) for image in out_images[n:]}
    assert added == {tuple([7] * 12), tuple(images[0].flatten().tolist())}


def test_a_sampler_that_drops_originals_is_refused():
    class Undersampler:
        def fit_resample(self, X, y):
            return X[1:], y[1:]

    images, labels = image_set(counts=[5, 2], size=2)
    with pytest.raises(ValueError, match="dropped or altered 1 of the 7"):
        resample_images(images, labels, Undersampler())


def test_bad_inputs_are_refused():
    images, labels = image_set(counts=[5, 2], size=2)
    with pytest.raises(ValueError, match="uint8"):
        resample_images(images.float(), labels, SMOTE())
    with pytest.raises(ValueError, match="one per image"):
        resample_images(images, labels[:3], SMOTE())


def test_synthetic_counts():
    assert synthetic_counts(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2, 2]), 4) == \
        [0, 1, 3, 0]
    with pytest.raises(ValueError, match="fewer"):
        synthetic_counts(torch.tensor([0, 0, 1]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        synthetic_counts(torch.tensor([0, 2]), torch.tensor([0, 2]), 2)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_plot_sample_grid_writes_a_png(tmp_path, channels, size):
    import matplotlib.image

    images, labels = image_set(counts=[12, 3, 2], channels=channels, size=size)
    # Class 2 gets no synthetic images: its row shows real ones and blank slots.
    synthetic, synthetic_labels = images[labels == 1][:2].flip(-1), torch.tensor([1, 1])
    path = tmp_path / "grid.png"
    plot_sample_grid(images, labels, synthetic, synthetic_labels, ["plane", "car", "bird"],
                     path, per_class=8)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    # 16 image slots across and three rows: wider than tall, every slot at least its pixel size.
    assert width > height and width >= 16 * size and height >= 3 * size
