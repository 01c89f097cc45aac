"""The schedule, batched augmentation and the training loop's selection on validation."""
import torch

from benchmark.train import Augment, Schedule, TensorBatches, fit


def test_schedule_matches_the_paper_at_200_epochs():
    s = Schedule(epochs=200)
    assert s.warmup_epochs == 5 and s.decay_epochs == (160, 180)
    assert s.lr_at(0) == 0.1 / 5 and s.lr_at(4) == 0.1
    assert s.lr_at(159) == 0.1
    assert abs(s.lr_at(160) - 0.001) < 1e-12 and abs(s.lr_at(180) - 1e-5) < 1e-15


def test_schedule_scales_to_short_runs():
    s = Schedule(epochs=30)
    assert s.warmup_epochs == 1 and s.decay_epochs == (24, 27)


def reference_crop_flip(image, dy, dx, flip, p):
    padded = torch.nn.functional.pad(image, (p, p, p, p))
    out = padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]
    return out.flip(-1) if flip else out


def test_augment_equals_per_image_crop_and_flip():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = Augment(padding=2, hflip=True)(images, torch.Generator().manual_seed(3))
    # Replay the same draws (same generator order) and build each image by hand.
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 5, (64, 1, 1), generator=g).flatten()
    dx = torch.randint(0, 5, (64, 1, 1), generator=g).flatten()
    flips = torch.rand(64, generator=g) < 0.5
    for i in range(64):
        expected = reference_crop_flip(images[i], int(dy[i]), int(dx[i]), bool(flips[i]), 2)
        assert torch.equal(out[i], expected)
    assert flips.any() and not flips.all()


def test_augment_without_flip_or_padding_keeps_orientation():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    assert torch.equal(Augment(padding=0, hflip=False)(images, torch.Generator()), images)


def test_fit_keeps_the_best_validation_epoch():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    x = torch.randn(32, 2)
    y = (x[:, 0] > 0).long()
    scores = iter([0.5, 0.9, 0.7])
    snapshots = []

    def validate():
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    result = fit(model, TensorBatches(x, y, 8, torch.Generator().manual_seed(0)),
                 torch.nn.CrossEntropyLoss(), Schedule(epochs=3, warmup_fraction=0), validate)
    assert result.best_epoch == 2 and result.best_score == 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k])
