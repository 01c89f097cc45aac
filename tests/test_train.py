"""The schedule, batched augmentation, the training loop's selection on validation, and the
bookkeeping of its CUDA-graph path (checked on the CPU)."""
import pytest
import torch

from benchmark import train
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


# The CUDA-graph path's bookkeeping, on the CPU: capture replaced by re-running the step --------
def small_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    x = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)  # 4 full batches of 16, then 6
    y = torch.randint(0, 3, (70,))
    augment = Augment(padding=2)
    batches = TensorBatches(x, y, 16, torch.Generator().manual_seed(5),
                            transform=lambda images, g: augment(images, g).float() / 255)
    return model, batches


class Captures:
    """A stand-in for ``capture_graph``: counts captures and replays; a replay reruns the step."""

    def __init__(self, fail=False):
        self.captures, self.replays, self.fail = 0, 0, fail

    def __call__(self, run, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1

        def replay():
            self.replays += 1
            run()

        return replay


def fit_small(schedule, loss_fn=None, **kwargs):
    model, batches = small_problem()
    result = fit(model, batches, loss_fn or torch.nn.CrossEntropyLoss(), schedule,
                 lambda: 0.0, **kwargs)
    return result, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(train, "GRAPH_DEVICE_TYPES", ("cuda", "cpu"))
    captures = Captures()
    monkeypatch.setattr(train, "capture_graph", captures)
    return captures


def test_graph_path_warms_up_captures_once_and_replays_full_batches(graphs_on_cpu):
    schedule = Schedule(epochs=4, warmup_fraction=0.5)  # the learning rate changes every epoch
    graphed, weights = fit_small(schedule, graph=True)
    eager, eager_weights = fit_small(schedule, graph=False)
    # 16 full batches: 3 eager warm-ups, then one capture replayed for the 13 others.
    assert graphs_on_cpu.captures == 1 and graphs_on_cpu.replays == 13
    # Fused SGD with the learning rate on the device: the same training up to rounding.
    for a, b in zip(graphed.history, eager.history):
        assert a["lr"] == b["lr"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert torch.allclose(weights, eager_weights, atol=1e-5)


class SwitchingLoss(torch.nn.CrossEntropyLoss):
    """Cross-entropy whose Python-side state changes at epoch 2, as deferred re-weighting's does."""

    def on_epoch(self, epoch):
        self.switched = epoch >= 2


def test_graph_is_captured_again_when_the_loss_changes(graphs_on_cpu):
    fit_small(Schedule(epochs=4), loss_fn=SwitchingLoss(), graph=True)
    assert graphs_on_cpu.captures == 2


def test_failed_capture_goes_on_eagerly(monkeypatch):
    monkeypatch.setattr(train, "GRAPH_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(train, "capture_graph", Captures(fail=True))
    with pytest.warns(RuntimeWarning, match="goes on eagerly"):
        failed, weights = fit_small(Schedule(epochs=2), graph=True)
    eager, eager_weights = fit_small(Schedule(epochs=2), graph=False)
    assert torch.allclose(weights, eager_weights, atol=1e-5)


def test_graph_needs_cuda_and_auto_stays_eager_on_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match="CUDA"):
        fit_small(Schedule(epochs=1), graph=True)
    never = Captures(fail=True)
    monkeypatch.setattr(train, "capture_graph", never)
    fit_small(Schedule(epochs=1), graph="auto")  # would warn if it tried to capture
    assert never.captures == 0
    _, batches = small_problem()
    assert batches.device_generator is None and batches.draws is batches.generator


class Doubling(torch.nn.Module):
    """A module whose Python-side flag a method flips between epochs."""

    def __init__(self):
        super().__init__()
        self.doubling = False

    def forward(self, x):
        return 2 * x if self.doubling else x


def test_graph_is_captured_again_when_a_model_flag_changes(graphs_on_cpu):
    model, batches = small_problem()
    model.append(Doubling())

    def flip(epoch, record):
        model[-1].doubling = epoch >= 2

    fit(model, batches, torch.nn.CrossEntropyLoss(), Schedule(epochs=4), lambda: 0.0,
        on_epoch=flip, graph=True)
    assert graphs_on_cpu.captures == 2


def test_graph_is_captured_again_when_a_hook_comes_or_goes(graphs_on_cpu):
    model, batches = small_problem()
    handles = []

    def hook_from_epoch_2(epoch, record):
        if epoch == 2:
            handles.append(model[0].register_forward_hook(lambda _m, _i, out: out * 0.5))

    fit(model, batches, torch.nn.CrossEntropyLoss(), Schedule(epochs=4), lambda: 0.0,
        on_epoch=hook_from_epoch_2, graph=True)
    assert graphs_on_cpu.captures == 2
