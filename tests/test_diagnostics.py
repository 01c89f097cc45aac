"""Diagnostics: each measure on hand-made arrays with known answers, then end to end in a run."""
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from benchmark import diagnostics_measures as measures
from benchmark.diagnostics import default_names


# Long-tail groups -----------------------------------------------------------------------------
def test_longtail_groups_use_100_and_20_from_a_largest_class_of_500_up():
    counts = [5000, 101, 100, 20, 19, 5]
    assert measures.longtail_thresholds(counts) == (100, 20)
    assert measures.longtail_groups(counts).tolist() == [
        "many", "many", "medium", "medium", "few", "few"]


def test_longtail_thresholds_scale_with_a_small_largest_class():
    counts = [108, 96, 74, 57, 44, 34, 26, 21, 16, 4]  # digits at 108 images: 21.6 and 4.32
    many_above, few_below = measures.longtail_thresholds(counts)
    assert math.isclose(many_above, 21.6) and math.isclose(few_below, 4.32)
    assert measures.longtail_groups(counts).tolist() == ["many"] * 7 + ["medium"] * 2 + ["few"]


def test_group_accuracy_pools_the_test_images_of_a_groups_classes():
    cm = np.array([[8, 2, 0], [1, 4, 0], [0, 3, 2]])
    groups = np.array(["many", "medium", "few"])
    assert measures.group_accuracy(cm, groups) == pytest.approx(
        {"many": 0.8, "medium": 0.8, "few": 0.4})
    both = measures.group_accuracy(cm, np.array(["many", "many", "few"]))
    assert both == pytest.approx({"many": 12 / 15, "few": 0.4})  # no medium class: left out


# Top-K coverage -------------------------------------------------------------------------------
W = np.array([[1.0, 1, 1, 1], [1.5, 0, 0, 0], [0, 0, 0, 1]])
B = np.array([0.0, 0.0, 0.5])
X = np.array([
    [3.0, 2, 1, 0],  # logits 6, 4.5, 0.5: CE_0 sorted 3, 2 -> 5 > 4.5 at K = 2
    [0.5, 0.5, 0.5, 2],  # 3.5, 0.75, 2.5: top 2 CE 2 + 0.5 = 2.5, not above 2.5; K = 3 is
    [2.0, 0, 0, 0.1],  # 2.1, 3.0, 0.6: predicted 1, its one CE 3 > 2.1
    [0.0, 0, 0, 4],  # 4, 0, 4.5: predicted 2, CE 4 plus bias 0.5 > 4 (without the bias: not)
    [0.2, 0.2, 0.2, 2.5],  # 3.1, 0.3, 3.0: top 2 2.7, top 3 2.9, all four 3.1 > 3.0
])


def test_topk_coverage_by_hand():
    covered = measures.topk_covered(X, W, B, ks=(2, 3, 5, 7))
    assert covered.tolist() == [[True] * 4, [False, True, True, True], [True] * 4, [True] * 4,
                                [False, False, True, True]]  # K above 4 features: all of them
    predicted = (X @ W.T + B).argmax(1)
    assert predicted.tolist() == [0, 0, 1, 2, 0]
    by_class = measures.coverage_by_class(covered, predicted, 4)
    np.testing.assert_allclose(by_class[0], [1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(by_class[1:3], 1.0)
    assert np.isnan(by_class[3]).all()  # a class nothing was predicted as
    assert covered[:, 0].mean() == pytest.approx(3 / 5)


def test_topk_coverage_with_given_predictions_uses_that_class():
    # Row 0 told it is class 1: its logit 4.5 is below the runner-up 6, never covered.
    covered = measures.topk_covered(X[:1], W, B, ks=(2, 7), predicted=np.array([1]))
    assert covered.tolist() == [[False, False]]


def test_runner_up_is_the_largest_other_logit():
    logits = np.array([[1.0, 5, 3], [2.0, 2, 0]])
    assert measures.runner_up(logits, np.array([1, 0])).tolist() == [3.0, 2.0]


# Weights, means, Frobenius --------------------------------------------------------------------
def test_weight_norms():
    assert measures.weight_norms(np.array([[3.0, 4], [0, 0], [1, 0]])).tolist() == [5, 0, 1]


def test_frobenius_of_a_known_difference_and_of_the_rows_both_hold():
    a = np.array([[1.0, 2], [3, 4]])
    assert measures.frobenius_of_difference(a, np.array([[1.0, 0], [0, 4]])) == \
        pytest.approx(math.sqrt(13))
    partial = np.array([[np.nan, np.nan], [0.0, 4]])
    assert measures.frobenius_of_difference(a, partial) == pytest.approx(3.0)
    distances = measures.row_distances(a, partial)
    assert np.isnan(distances[0]) and distances[1] == pytest.approx(3.0)


def test_class_means_leave_a_missing_class_nan():
    x = np.array([[1.0, 2], [3, 4], [10, 10]])
    means = measures.class_means(x, np.array([0, 0, 2]), 3)
    np.testing.assert_allclose(means[[0, 2]], [[2, 3], [10, 10]])
    assert np.isnan(means[1]).all()


# Linear form of heads -------------------------------------------------------------------------
def test_linear_form_of_a_linear_head_a_cosine_head_and_neither():
    from baselines.losses import CosineHead

    torch.manual_seed(0)
    probe = np.random.default_rng(0).random((16, 5)).astype(np.float32)
    linear = torch.nn.Linear(5, 3)
    form = measures.head_linear_form(linear, probe)
    assert form is not None and not form.normalise
    np.testing.assert_allclose(form.logits(probe), linear(torch.from_numpy(probe)).detach(),
                               rtol=1e-5, atol=1e-5)
    cosine = CosineHead(5, 3)
    form = measures.head_linear_form(cosine, probe)
    assert form is not None and form.normalise
    np.testing.assert_allclose(np.linalg.norm(form.weight, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(form.logits(probe), cosine(torch.from_numpy(probe)).detach(),
                               rtol=1e-5, atol=1e-5)
    class Scaled(torch.nn.Module):  # a wrapper without a weight of its own (LWS-like)
        def __init__(self):
            super().__init__()
            self.head, self.scales = torch.nn.Linear(5, 3), torch.tensor([1.0, 2.0, 0.5])

        def forward(self, x):
            return self.head(x) * self.scales

    scaled = Scaled()
    form = measures.head_linear_form(scaled, probe)
    np.testing.assert_allclose(form.weight, scaled.head.weight.detach() * scaled.scales[:, None],
                               rtol=1e-5, atol=1e-6)
    not_linear = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU())
    assert measures.head_linear_form(not_linear, probe - 0.5) is None


# Feature identities ---------------------------------------------------------------------------
def test_class_top_members_and_their_overlap():
    values = np.array([[3.0, 2, 1], [3, 1, 2], [3, 2, 0], [0, 1, 5]])
    classes = np.array([0, 0, 0, 1])
    members = measures.class_top_members(values, classes, 3, members=2)
    # Class 0's rows rank features {0, 1}, {0, 2}, {0, 1} in their top 2: 0 thrice, 1 twice.
    assert members[0].tolist() == [0, 1]
    assert members[1].tolist() == [1, 2]  # one row: {2, 1}, tied counts by index
    assert members[2] is None
    overlap = measures.identity_overlap(members, [np.array([0, 2]), np.array([2, 1]), None])
    assert overlap[:2].tolist() == [0.5, 1.0] and np.isnan(overlap[2])


# EOS's record ---------------------------------------------------------------------------------
def test_eos_record_per_class():
    y = np.array([0, 0, 0, 1, 1, 2])
    base, partner = np.array([3, 3, 4, 5]), np.array([0, 4, 1, 5])  # 4: a friend; 5: itself
    step = np.array([0.5, 0.1, 0.3, 0.0])
    record = measures.eos_record(y, base, partner, step, fallback=[2], num_classes=3)
    assert record["synthetic"].tolist() == [0, 3, 1]
    assert np.isnan(record["enemy_share"][0])
    assert record["enemy_share"][1:].tolist() == pytest.approx([2 / 3, 0.0])
    assert record["step_mean"][1:].tolist() == pytest.approx([0.3, 0.0])
    assert record["bases"].tolist() == [0, 2, 1]
    assert record["fallback"].tolist() == [0, 0, 1]


# balanced-head --------------------------------------------------------------------------------
def test_pool_top_up_brings_classes_to_the_largest_from_unused_images():
    from baselines.balanced_head import pool_top_up

    labels = np.array([0] * 5 + [1] * 5 + [2] * 3)
    train, val = np.array([0, 1, 2, 3, 5, 6, 10]), np.array([4, 7, 11])
    chosen = pool_top_up(labels, train, val, seed=0)
    # Class 0 (4 images) is the largest; class 1 needs 2 (8, 9 spare), class 2 needs 3 but
    # has only image 12 spare.
    assert sorted(chosen.tolist()) == [8, 9, 12]
    assert pool_top_up(labels, train, val, seed=0).tolist() == chosen.tolist()


# End to end -----------------------------------------------------------------------------------
def artifacts(run_id):
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "diagnostics")}


def test_defaults_are_the_cheap_ones():
    assert set(default_names()) == {"longtail", "gap", "topk", "weights", "overlap",
                                    "eos-record"}


def test_eos_run_logs_the_analyses_their_figures_and_the_tsne_map(
        mlflow_store, tiny_config, monkeypatch):
    from benchmark.diagnostics import EmbeddingMap
    from benchmark.pipeline import run_cell

    monkeypatch.setattr(EmbeddingMap, "max_points", 120)  # t-SNE's cost, not its behaviour
    chosen = ["longtail", "gap", "topk-figure", "weights", "overlap", "eos-figure", "tsne"]
    result = run_cell(tiny_config(diagnostics=chosen), progress=False)
    metrics = mlflow.get_run(result["run_id"]).data.metrics
    for name in ("longtail/many_acc", "longtail/medium_acc", "longtail/many_above",
                 "longtail/few_below", "longtail/top1_error", "gap/tp", "gap/real",
                 "diag/topk_coverage_train_k3", "diag/topk_coverage_tp_k7",
                 "diag/fe_frobenius_tp", "diag/fe_overlap_tp", "eos/enemy_share"):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert metrics["longtail/top1_error"] == pytest.approx(1 - metrics["test/accuracy"])
    assert metrics["eos/enemy_share"] == 1.0  # the true nearest-enemy rule
    assert "class/weight_norm_0" in metrics and "class/topk_coverage_train_k2_9" in metrics
    assert {"diagnostics/gap_by_class_size.png", "diagnostics/gap_tp_fp.png",
            "diagnostics/weight_norms.png", "diagnostics/topk_coverage.png",
            "diagnostics/eos_record.csv", "diagnostics/eos_record.png",
            "diagnostics/embedding_map.png"} <= artifacts(
        result["run_id"])
    record = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=result["run_id"], artifact_path="diagnostics/eos_record.csv"))
    real = record["train_real"].to_numpy()
    assert (record["synthetic"] + real).tolist() == [real.max()] * len(real)
    assert metrics["eos/synthetic"] == record["synthetic"].sum()


def test_balanced_head_retrains_on_real_pool_embeddings_of_phase1s_extractor(
        mlflow_store, tiny_config, monkeypatch):
    from benchmark.pipeline import run_cell

    first = run_cell(tiny_config(method="none", diagnostics=[]), progress=False)
    result = run_cell(tiny_config(method="balanced-head", diagnostics=["gap"]),
                      progress=False)
    assert result["phase1_run_id"] == first["run_id"]  # the imbalanced extractor, shared
    run = mlflow.get_run(result["run_id"])
    totals = eval(run.data.params["balanced_pool_counts"])
    counts = eval(run.data.params["train_class_counts"])
    assert max(totals) == max(counts) and all(t >= n for t, n in zip(totals, counts))
    assert "time/pool_embedding_s" in run.data.metrics and "gap/tp" in run.data.metrics
    resampled = np.load(mlflow.artifacts.download_artifacts(
        run_id=result["run_id"], artifact_path="results/resampled_train.npz"))
    assert np.bincount(resampled["y"]).tolist() == totals

    # The method embeds with phase 1's extractor: asked for images of the training subset, it
    # returns phase 1's own embeddings of them.
    import baselines.balanced_head as balanced_head
    from benchmark.cell import Cell
    from benchmark.methods import make_method
    from benchmark.pipeline import load_phase1, pick_device, prepare_data

    cfg = tiny_config(method="balanced-head").resolved()
    data = prepare_data(cfg)
    monkeypatch.setattr(balanced_head, "pool_top_up", lambda *args: data.train_indices[3:9])
    method = make_method("balanced-head")
    cell = Cell(cfg=cfg, method=method, data=data, device=pick_device(cfg.device), loss=None,
                progress=False)
    phase1 = load_phase1(first["run_id"])
    method.phase2_outputs(cell, phase1)
    x, y = method.embedding_resampler(0).fit_resample(phase1.embeddings["train_x"][:2],
                                                      phase1.embeddings["train_y"][:2])
    expected = phase1.embeddings["train_x"][3:9]
    # On CUDA phase 1 embedded in channels-last with TF32 convolutions: equal to about 1e-3.
    np.testing.assert_allclose(x[2:], expected, rtol=0, atol=1e-2 * np.abs(expected).max())
    assert y.tolist() == phase1.embeddings["train_y"][[0, 1, 3, 4, 5, 6, 7, 8]].tolist()


# Figures across a grid ------------------------------------------------------------------------
def tidy_runs_by_hand() -> pd.DataFrame:
    """Runs as ``report.gather_runs`` gives them: 2 ratios x 2 methods x 2 seeds on 3 classes."""
    import json

    from benchmark.report import TRAINING_SETTINGS

    rows = []
    for ratio, counts in ((10, [100, 30, 10]), (50, [100, 14, 2])):
        for method, scale in (("none", 1.0), ("eos", 0.5)):
            for seed in (0, 1):
                row = {"run_id": f"{method}-{ratio}-{seed}", "experiment": "x",
                       "start_time": seed, "dataset": "digits", "profile": "exp",
                       "ratio": float(ratio), "backbone": "resnet32", "loss": "ce",
                       "method": method, "seed": seed, "backbone_label": "resnet32",
                       "loss_label": "ce", "method_label": method, "method_variant": method,
                       "K": "", "train_class_counts": json.dumps(counts),
                       "gap/overall": scale * ratio + seed, "gap/fp": 2 * scale * ratio}
                row.update({f: "" for f in TRAINING_SETTINGS})
                for c in range(3):
                    row[f"class/weight_norm_{c}"] = 1.0 + c * scale
                    for k in measures.COVERAGE_KS:
                        row[f"class/topk_coverage_train_k{k}_{c}"] = min(1.0, k / 7 + c / 10)
                rows.append(row)
    return pd.DataFrame(rows)


def test_analysis_figures_across_a_grid(tmp_path):
    from benchmark.analysis import analysis_figures

    written = analysis_figures(tidy_runs_by_hand(), tmp_path, prefix="smoke")
    names = sorted(path.name for _, path in written)
    assert names == ["smoke-gap-vs-ratio-digits-exp-resnet32.png",
                     "smoke-topk-by-class-size-digits-exp-r10-resnet32.png",
                     "smoke-topk-by-class-size-digits-exp-r50-resnet32.png",
                     "smoke-weight-norms-digits-exp-r10-resnet32.png",
                     "smoke-weight-norms-digits-exp-r50-resnet32.png"]
    assert all(path.stat().st_size > 0 for _, path in written)
    runs = tidy_runs_by_hand().drop(columns=[c for c in tidy_runs_by_hand() if "/" in c])
    assert analysis_figures(runs, tmp_path / "none") == []  # no diagnostics logged: no figure


def test_a_failing_diagnostic_costs_only_its_own_output(mlflow_store, tiny_config,
                                                        monkeypatch, capsys):
    from benchmark.diagnostics import GapDiagnostic
    from benchmark.pipeline import run_cell

    def broken(self, cell, results, folder):
        raise ValueError("boom")

    monkeypatch.setattr(GapDiagnostic, "on_cell_end", broken)
    result = run_cell(tiny_config(method="none", diagnostics=["gap", "longtail"]),
                      progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and "test/bac" in run.data.metrics
    assert "longtail/top1_error" in run.data.metrics
    assert run.data.tags["diagnostics_failed"] == "gap"
    assert "diagnostic gap failed and is left out: ValueError: boom" in \
        capsys.readouterr().err
