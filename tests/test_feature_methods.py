"""Feature-level comparators: RSG in phase 1, CAM-based augmentation, cRT, tau-norm and LWS."""
import math

import mlflow
import pytest
import torch
from torch import nn

from baselines.cam import cam_masks, class_activation_maps, head_and_tail, mixed_embeddings
from baselines.decoupling import ClassBalancedBatches, ScaledHead, tau_normalized
from baselines.rsg import RareClassSampleGenerator, head_classes
from benchmark.cell import Cell
from benchmark.errors import UserError
from benchmark.losses import CrossEntropy
from benchmark.pipeline import (Phase1, build_model, final_model, load_phase1, normalizer,
                                prepare_data, run_cell)


def digits_cell(tiny_config, **overrides) -> Cell:
    cfg = tiny_config(**overrides).resolved()
    data = prepare_data(cfg)
    return Cell(cfg=cfg, method=cfg.method_instance(), data=data, device=torch.device("cpu"),
                loss=CrossEntropy(data.class_counts), progress=False)


def rsg_module(variant="paper", beta=1.0, channels=4, num_classes=4):
    torch.manual_seed(0)
    return RareClassSampleGenerator(channels, num_classes, head=[0], centres=3,
                                    contrastive_channels=8, beta=beta, variant=variant).train()


# RSG ------------------------------------------------------------------------------------------
def test_rsg_grows_the_batch_by_the_papers_count_and_only_while_generating():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 2, 3])  # 6 frequent (class 0), 2 rare
    maps = torch.randn(8, 4, 3, 3)
    for beta, new in ((1.0, 6), (0.5, 2), (0.01, 2)):  # max(floor(beta * 6 / 2), 1) * 2
        module = rsg_module(beta=beta)
        module.generating.fill_(True)
        module.labels = labels
        out = module(maps)
        grown, cesc, mv = module.take()
        assert out.shape == (8 + new, 4, 3, 3) and len(grown) == 8 + new
        assert torch.equal(grown[:8], labels) and set(grown[8:].tolist()) <= {2, 3}
        assert math.isfinite(cesc.item()) and math.isfinite(mv.item()) and mv.item() > 0
    module = rsg_module()
    module.labels = labels
    assert module(maps).shape == maps.shape  # before the threshold: no new samples
    _, cesc, mv = module.take()
    assert math.isfinite(cesc.item()) and mv.item() == 0


def test_rsg_losses_train_only_its_own_parts_and_the_variants_differ_on_new_samples():
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    for variant, backbone_learns in (("paper", True), ("public-code", False)):
        module = rsg_module(variant)
        module.generating.fill_(True)
        maps = torch.randn(6, 4, 3, 3, requires_grad=True)
        module.labels = labels
        out = module(maps)
        _, cesc, mv = module.take()
        (cesc + mv).backward(retain_graph=True)
        assert maps.grad is None  # L_CESC and L_MV never reach the backbone
        assert module.transform.weight.grad.abs().sum() > 0 and module.centres.grad is not None
        assert all(p.grad is None for p in module.contrastive.parameters())  # frozen
        out[6:].sum().backward()  # the classification loss of the new samples
        assert (maps.grad is not None and maps.grad.abs().sum() > 0) == backbone_learns


def test_rsg_is_absent_from_the_evaluated_model(tiny_config):
    cell = digits_cell(tiny_config, method="rsg", loss="ldam-drw")
    model = build_model(cell)
    assert "rsg" in dict(model.named_children())
    assert not any(k.startswith("extractor.") and "rsg" in k for k in model.state_dict())
    x = normalizer(cell)(cell.data.train.images[:32])
    step = cell.method.train_step(cell)
    cell.method.module.generating.fill_(True)
    model.train()
    loss = step(model, x, cell.data.train.labels[:32], cell.loss)
    assert math.isfinite(loss.item()) and cell.method.module.totals["generated"] > 0
    loss.backward()
    model.eval()
    phase1 = Phase1({}, {k: v.detach() for k, v in model.state_dict().items()}, {}, "run")
    served = final_model(cell, phase1, model.head).eval()
    assert not any(isinstance(m, RareClassSampleGenerator) for m in served.modules())
    with torch.no_grad():
        assert torch.allclose(served(cell.data.train.images[:32]), model(x), atol=1e-5)


def test_rsg_refuses_an_unknown_stage_and_takes_the_largest_classes_as_head(tiny_config):
    cell = digits_cell(tiny_config, method="rsg", method_params={"stage": "stage9"})
    with pytest.raises(UserError, match="no stage 'stage9'"):
        build_model(cell)
    assert head_classes([5, 50, 20, 50, 1], 0.2) == [1]
    assert head_classes([5, 50, 20, 50, 1], 0.5) == [1, 3]
    assert head_classes([3, 1], 1.0) == [0]  # never every class


# CAM ------------------------------------------------------------------------------------------
def test_cam_masks_select_the_right_fractions_of_a_hand_made_map():
    values = torch.arange(10.0).reshape(1, 2, 5)  # CAM 0..9 -> normalised k / 9
    maps = torch.stack([values[0], torch.zeros(2, 5)])[None]  # channel 1 carries nothing
    cams = class_activation_maps(maps, torch.tensor([[1.0, 5.0]]))
    assert torch.allclose(cams.flatten(), torch.arange(10.0) / 9)
    specific, generic = cam_masks(cams, 0.8, 0.2)
    assert specific.flatten().tolist() == [False] * 8 + [True] * 2  # 8/9 and 9/9
    assert generic.flatten().tolist() == [True] * 2 + [False] * 8  # 0 and 1/9
    specific, generic = cam_masks(cams, 0.5, 0.5)
    assert specific.float().mean() == 0.5 and generic.float().mean() == 0.5
    flat, _ = cam_masks(class_activation_maps(torch.ones(1, 2, 2, 5), torch.ones(1, 2)), 0.8, 0.2)
    assert flat.all()  # a constant map: every position on both sides


def test_cam_mixture_averages_the_drawn_specific_and_generic_vectors():
    specific_vector, generic_vector, length = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0]), 6
    maps_s = torch.zeros(3, 2, length)
    maps_s[:, :, :2] = specific_vector[:, None]  # specific positions 0 and 1 hold one vector
    maps_g = torch.full((3, 2, length), 99.0)
    maps_g[:, :, 4:] = generic_vector[:, None]
    specific = torch.zeros(3, length, dtype=torch.bool)
    specific[:, :2] = True
    generic = torch.zeros(3, length, dtype=torch.bool)
    generic[:, 4:] = True
    n_specific = torch.tensor([1, 3, 5])
    mixed = mixed_embeddings(maps_s, specific, maps_g, generic, n_specific,
                             torch.Generator().manual_seed(0))
    expected = (n_specific[:, None] * specific_vector + (length - n_specific)[:, None]
                * generic_vector) / length
    assert torch.allclose(mixed, expected)


def test_cam_head_classes_cover_the_share_and_leave_a_tail():
    assert head_and_tail([100, 50, 30, 10, 10], 0.9) == ([0, 1, 2], [3, 4])
    assert head_and_tail([10, 10], 0.9) == ([0], [1])


# Decoupling -----------------------------------------------------------------------------------
def test_tau_zero_leaves_the_head_unchanged_and_tau_one_gives_unit_norms():
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    x = torch.randn(7, 5)
    same = tau_normalized(head, 0.0)
    assert same is not head and torch.equal(same(x), head(x))
    unit = tau_normalized(head, 1.0)
    assert torch.allclose(unit.weight.norm(dim=1), torch.ones(3))
    assert torch.equal(unit.bias, head.bias) and not torch.equal(unit.weight, head.weight)


def test_lws_with_unit_scales_equals_the_plain_head_and_trains_only_the_scales():
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    x = torch.randn(7, 5)
    expected = head(x)
    scaled = ScaledHead(head, 3)
    assert torch.equal(scaled(x), expected)
    assert [name for name, p in scaled.named_parameters() if p.requires_grad] == ["scales"]
    with torch.no_grad():
        scaled.scales.copy_(torch.tensor([1.0, 2.0, 0.5]))
    assert torch.allclose(scaled(x), expected * torch.tensor([1.0, 2.0, 0.5]))


def test_class_balanced_batches_draw_every_class_equally_often():
    targets = torch.tensor([0] * 90 + [1] * 9 + [2])
    batches = ClassBalancedBatches(torch.arange(100.0)[:, None], targets, 50,
                                   torch.Generator().manual_seed(0))
    drawn = torch.cat([y for _ in range(20) for _, y in batches])
    assert len(batches) == 2 and len(drawn) == 2000
    shares = torch.bincount(drawn, minlength=3) / len(drawn)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.04)
    x, y = next(iter(batches))
    assert torch.equal(targets[x[:, 0].long()], y)  # each row keeps its own label


# End to end ----------------------------------------------------------------------------------
def test_post_hoc_feature_methods_share_the_eos_phase1(mlflow_store, tiny_config):
    eos = run_cell(tiny_config(epochs=1), progress=False)
    for method, params in (("cam-aug", {"iterations": 12}), ("crt", {}), ("tau-norm", {}),
                           ("lws", {})):
        result = run_cell(tiny_config(method=method, method_params=params, epochs=1),
                          progress=False)
        run = mlflow.get_run(result["run_id"])
        assert result["phase1_reused"] and result["phase1_run_id"] == eos["run_id"], method
        assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["test/bac"])
        if method == "tau-norm":
            assert 0 <= run.data.metrics["tau_norm/tau"] <= 2
            assert "phase3/val_bac" not in run.data.metrics
        else:
            assert "phase3/best_val_bac" in run.data.metrics
        if method == "cam-aug":  # 12 iterations of 4 batches a pass: 3 epochs
            assert run.data.metrics["phase3/best_epoch"] <= 3
            history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "phase3/val_bac")
            assert len(history) == 3


def test_rsg_trains_a_phase1_of_its_own_without_rsg_in_its_embeddings(mlflow_store, tiny_config):
    result = run_cell(tiny_config(method="rsg", loss="ldam-drw", epochs=3),  # generates in 3
                      progress=False)
    run = mlflow.get_run(result["run_id"])
    assert not result["phase1_reused"] and run.info.status == "FINISHED"
    shared = tiny_config(method="eos", loss="ldam-drw", epochs=3).resolved().phase1_key()
    assert run.data.tags["phase1_key"] != shared
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "rsg/generated")
    assert [m.value > 0 for m in sorted(history, key=lambda m: m.step)] == [False, False, True]
    assert math.isfinite(run.data.metrics["rsg/cesc"]) and run.data.metrics["rsg/mv"] > 0
    phase1 = load_phase1(result["phase1_run_id"])
    assert any(k.startswith("rsg.") for k in phase1.state_dict)
    cell = digits_cell(tiny_config, method="rsg", loss="ldam-drw", epochs=3)
    served = final_model(cell, phase1, nn.Identity()).eval()  # uint8 images -> embeddings
    with torch.no_grad():
        embeddings = served(cell.data.test.images)
    assert torch.allclose(embeddings, torch.as_tensor(phase1.embeddings["test_x"]), atol=1e-5)
