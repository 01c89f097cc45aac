"""Cost-sensitive losses against hand-computed values, class weights and deferred re-weighting."""
from __future__ import annotations

import pytest
import torch

from baselines.losses import CosineHead
from benchmark.errors import UserError
from benchmark.losses import class_balanced_weights
from benchmark.registry import LOSSES
from benchmark.train import Schedule

COUNTS = [100, 10, 1]
LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
TARGETS = torch.tensor([0, 1])
# softmax(LOGITS): row 0 = [0.785597, 0.175290, 0.039113], row 1 = [0.042010, 0.114195, 0.843795]


def make(name: str, counts=COUNTS, epochs: int = 200, **params):
    return LOSSES.create(name, class_counts=counts, schedule=Schedule(epochs=epochs), **params)


def test_focal_matches_hand_computation():
    # p_true = 0.785597 and 0.114195; ce = -log p_true = 0.241311 and 2.169846;
    # (1 - p)^2 * ce = 0.214403^2 * 0.241311 = 0.011093 and 0.885805^2 * 2.169846 = 1.702570.
    loss = make("focal")
    assert loss(LOGITS, TARGETS).item() == pytest.approx((0.011093 + 1.702570) / 2, abs=1e-5)
    assert loss.params == {"weighting": "none", "gamma": 2.0}


def test_focal_with_gamma_zero_is_cross_entropy():
    ce = torch.nn.functional.cross_entropy(LOGITS, TARGETS)
    assert make("focal", gamma=0.0)(LOGITS, TARGETS).item() == pytest.approx(ce.item(), rel=1e-6)


def test_asl_matches_hand_computation():
    # Targets smoothed by eps 0.1 over 3 classes: 0.933333 on the true class, 0.033333 elsewhere.
    # True class weighted (1 - p)^0 = 1; the others p^4.  Row 0 (true class 0):
    #   0.933333 * -log 0.785597 + 0.033333 * (0.175290^4 * -log 0.175290
    #                                          + 0.039113^4 * -log 0.039113) = 0.225279
    # Row 1 (true class 1):
    #   0.933333 * -log 0.114195 + 0.033333 * (0.042010^4 * -log 0.042010
    #                                          + 0.843795^4 * -log 0.843795) = 2.028060
    loss = make("asl")
    assert loss(LOGITS, TARGETS).item() == pytest.approx((0.225279 + 2.028060) / 2, abs=1e-5)
    assert loss.params == {"weighting": "none", "gamma_pos": 0.0, "gamma_neg": 4.0, "eps": 0.1}


def test_ldam_margins_and_loss_match_hand_computation():
    loss = make("ldam")
    # n^-1/4 = [0.316228, 0.562341, 1], scaled so the rarest class gets max_m = 0.5.
    assert loss.margins.tolist() == pytest.approx([0.158114, 0.281171, 0.5], abs=1e-6)
    cosines = torch.tensor([[0.5, 0.1, -0.2], [0.3, 0.2, 0.4]])
    targets = torch.tensor([0, 2])
    # Row 0: 30 * [0.5 - 0.158114, 0.1, -0.2] = [10.256584, 3, -6]
    #   -> log(1 + e^(3 - 10.256584) + e^(-6 - 10.256584)) = 0.000705
    # Row 1: 30 * [0.3, 0.2, 0.4 - 0.5] = [9, 6, -3] -> log(e^9 + e^6 + e^-3) + 3 = 12.048593
    assert loss(cosines, targets).item() == pytest.approx((0.000705 + 12.048593) / 2, abs=1e-5)
    assert loss.params == {"weighting": "none", "max_m": 0.5, "s": 30.0}


def test_ldam_head_is_a_cosine_classifier_and_phase3_drops_the_margins():
    loss = make("ldam")
    head = loss.make_head(8, 3)
    assert isinstance(head, CosineHead)
    embeddings = torch.rand(5, 8)
    cosines = head(embeddings)
    assert cosines.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(head(10 * embeddings), cosines)  # the length is ignored
    # Phase 3 trains on balanced embeddings: same scale, no margins, no weights.
    cosines = torch.tensor([[0.3, 0.2, 0.4]])
    target = torch.tensor([2])
    expected = torch.nn.functional.cross_entropy(30 * cosines, target)
    assert loss.head_loss()(cosines, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_balanced_weights_sum_to_the_class_count():
    weights = class_balanced_weights(COUNTS, beta=0.9999)
    # (1 - beta) / (1 - beta^n) = [0.0100496, 0.100045, 1] before normalising to sum to 3.
    assert weights.tolist() == pytest.approx([0.027159, 0.270369, 2.702472], abs=1e-5)
    assert weights.sum().item() == pytest.approx(3.0)
    assert class_balanced_weights([5, 5, 5, 5]).tolist() == pytest.approx([1.0] * 4)


def test_class_balanced_cross_entropy_is_torch_weighted_cross_entropy():
    weights = class_balanced_weights(COUNTS)
    expected = torch.nn.functional.cross_entropy(LOGITS, TARGETS, weight=weights)
    loss = make("cb-ce")
    assert loss(LOGITS, TARGETS).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.params == {"weighting": "cb", "beta": 0.9999}


def test_ldam_drw_switches_to_class_balanced_weights_exactly_at_the_first_decay():
    loss = make("ldam-drw", epochs=10)
    first_decay = loss.schedule.decay_epochs[0]
    assert first_decay == 8
    cosines = torch.tensor([[0.5, 0.1, -0.2], [0.3, 0.2, 0.4]])
    targets = torch.tensor([0, 2])
    unweighted = make("ldam")(cosines, targets).item()
    # Weighted by class-balanced w_0 = 0.027159 and w_2 = 2.702472, normalised by their sum:
    # (0.027159 * 0.000705 + 2.702472 * 12.048593) / (0.027159 + 2.702472) = 11.928722.
    for epoch in range(10):
        loss.on_epoch(epoch)
        if epoch < first_decay:
            assert loss.class_weights is None
            assert loss(cosines, targets).item() == pytest.approx(unweighted, rel=1e-6)
        else:
            torch.testing.assert_close(loss.class_weights, class_balanced_weights(COUNTS))
            assert loss(cosines, targets).item() == pytest.approx(11.928722, abs=1e-4)


@pytest.mark.parametrize("name", ["ce-drw", "focal-drw", "asl-drw", "ldam-drw"])
def test_every_drw_loss_uses_the_same_deferred_weights(name):
    loss = make(name)
    loss.on_epoch(159)
    assert loss.class_weights is None
    loss.on_epoch(160)
    torch.testing.assert_close(loss.class_weights, class_balanced_weights(COUNTS))
    assert loss.params["weighting"] == "drw" and loss.params["beta"] == 0.9999


def test_preset_weighting_cannot_be_overridden():
    with pytest.raises(UserError):
        make("focal-drw", weighting="cb")


LOSS_NAMES = ["focal", "asl", "ldam", "cb-ce", "cb-focal", "ce-drw", "focal-drw", "asl-drw",
              "ldam-drw"]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_takes_bf16_logits_and_computes_in_float32(name):
    loss = make(name)
    loss.on_epoch(199)  # the re-weighted part of a DRW schedule
    logits = (LOGITS / 4).to(torch.bfloat16).requires_grad_()  # cosine-sized for LDAM
    value = loss(logits, TARGETS)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(loss(logits.detach().float(), TARGETS).item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(logits.grad.float()).all()


# What each loss must log on top of the run's own parameters (MLflow stores strings).
EXPECTED_PARAMS = {
    "focal": {"loss_hparam.gamma": "2.0"},
    "asl": {"loss_hparam.gamma_pos": "0.0", "loss_hparam.gamma_neg": "4.0", "loss_hparam.eps": "0.1"},
    "ldam": {"loss_hparam.max_m": "0.5", "loss_hparam.s": "30.0"},
    "cb-ce": {"loss_hparam.weighting": "cb", "loss_hparam.beta": "0.9999"},
    "cb-focal": {"loss_hparam.weighting": "cb", "loss_hparam.beta": "0.9999", "loss_hparam.gamma": "2.0"},
    "ce-drw": {"loss_hparam.weighting": "drw", "loss_hparam.beta": "0.9999"},
    "focal-drw": {"loss_hparam.weighting": "drw", "loss_hparam.gamma": "2.0"},
    "asl-drw": {"loss_hparam.weighting": "drw", "loss_hparam.gamma_neg": "4.0"},
    "ldam-drw": {"loss_hparam.weighting": "drw", "loss_hparam.max_m": "0.5", "loss_hparam.s": "30.0"},
}


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_end_to_end_run_finishes_with_its_parameters(name, mlflow_store, tiny_config):
    import mlflow

    from benchmark.pipeline import run_cell

    cfg = tiny_config(loss=name, backbone="resnet20", epochs=1, head_epochs=1, device="cpu")
    result = run_cell(cfg, reuse_phase1=False, progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss"] == name
    assert EXPECTED_PARAMS[name].items() <= run.data.params.items()
