"""The architecture-study backbones: WideResNet-28, DenseNet-BC and any timm model."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmark.errors import UserError
from benchmark.registry import BACKBONES

# Small settings: the shapes and the embedding contract do not depend on width or depth.
# timm's test_resnet is a 0.37M-parameter ResNet that timm ships for exactly this purpose.
SMALL = {"wrn28": {"widen_factor": 1}, "densenet": {"depth": 16}, "timm:test_resnet": {}}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_backbone_gives_pooled_non_negative_embedding(name, in_channels):
    torch.manual_seed(0)
    extractor = BACKBONES.create(name, in_channels=in_channels, image_size=32, **SMALL[name])
    embeddings = extractor(torch.randn(4, in_channels, 32, 32))
    assert embeddings.shape == (4, extractor.embedding_dim)
    assert (embeddings >= 0).all()
    assert embeddings.abs().sum() > 0


def test_architectures_match_published_parameter_counts():
    # Built on the meta device: counting needs shapes, not 36M initialised weights.
    with torch.device("meta"):
        wrn_28_10 = BACKBONES.create("wrn28", widen_factor=10)
        default_wrn = BACKBONES.create("wrn28")
        default_densenet = BACKBONES.create("densenet")
    assert round(parameter_count(wrn_28_10) / 1e6, 1) == 36.5  # Zagoruyko & Komodakis, Table 2
    assert round(parameter_count(default_densenet) / 1e6, 1) == 0.8  # Huang et al., BC-100 k=12
    assert default_densenet.embedding_dim == 342
    # The default WRN-28-3 is about 4x ResNet-56 (0.85M), the EOS paper's "approx. 5X".
    assert default_wrn.embedding_dim == 192
    assert 3.2e6 < parameter_count(default_wrn) < 3.4e6


@pytest.mark.parametrize("name,params", [("wrn28", {"widen_factor": 0}), ("densenet", {"depth": 50})])
def test_bad_architecture_parameters_are_user_errors(name, params):
    with pytest.raises(UserError):
        BACKBONES.create(name, in_channels=3, image_size=32, **params)


def test_unknown_timm_model_is_a_one_line_user_error():
    with pytest.raises(UserError) as raised:
        BACKBONES.create("timm:no_such_net", in_channels=3, image_size=32)
    assert "no_such_net" in str(raised.value) and "\n" not in str(raised.value)


def test_timm_embedding_dim_follows_pre_logits_projection():
    # MobileNetV3 pools 288 channels, then projects them to 1024 before its classifier.
    extractor = BACKBONES.create("timm:mobilenetv3_small_050", in_channels=3, image_size=32)
    extractor.eval()
    assert extractor(torch.randn(2, 3, 32, 32)).shape == (2, extractor.embedding_dim)
    assert extractor.embedding_dim == 1024


def test_fixed_input_size_timm_model_is_built_for_the_image_size():
    # timm's test_vit is built for 160x160 unless told otherwise.
    extractor = BACKBONES.create("timm:test_vit", in_channels=1, image_size=32)
    assert extractor(torch.randn(2, 1, 32, 32)).shape == (2, extractor.embedding_dim)


def test_timm_is_imported_only_when_a_timm_backbone_is_built():
    check = "import sys, benchmark.models.timm_backbone; assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)


@pytest.mark.parametrize("backbone", sorted(SMALL))
def test_backbone_end_to_end_run_finishes(backbone, mlflow_store, tiny_config):
    import mlflow

    from benchmark.pipeline import run_cell

    cfg = tiny_config(backbone=backbone, backbone_params=SMALL.get(backbone, {}), epochs=1,
                      head_epochs=1, image_size=8, device="cpu")
    result = run_cell(cfg, reuse_phase1=False, progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == backbone
    for name, value in SMALL.get(backbone, {}).items():
        assert run.data.params[f"backbone.{name}"] == str(value)


def test_unknown_timm_model_fails_before_any_run(mlflow_store, tiny_config):
    import mlflow

    from benchmark.errors import UserError
    from benchmark.pipeline import run_cell

    with pytest.raises(UserError, match="no-such-net"):
        run_cell(tiny_config(backbone="timm:no-such-net"), progress=False)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize("name", ["resnet20", "wrn28", "densenet"])
def test_backbones_expose_stages_a_module_can_be_inserted_at(name):
    from torch import nn

    from benchmark.models import Classifier, backbone_stages, insert_after_stage, linear_head
    from benchmark.registry import BACKBONES

    params = {"depth": 10} if name == "densenet" else {}
    torch.manual_seed(0)
    extractor = BACKBONES.create(name, in_channels=3, image_size=16, **params)
    model = Classifier(extractor, linear_head(extractor.embedding_dim, 4)).eval()
    assert list(backbone_stages(extractor)) == ["stage1", "stage2", "stage3"]
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    handle = insert_after_stage(model, "stage2", nn.Identity(), "probe")
    assert torch.equal(model(x), before)
    handle.remove()
    zeroing = insert_after_stage(model, "stage2", nn.Dropout(p=1.0).train(), "zeroing")
    assert not torch.equal(model(x), before)
    zeroing.remove()
    assert torch.equal(model(x), before)
    assert "zeroing" in dict(model.named_modules())


def test_a_backbone_without_stages_is_refused_in_one_line():
    from torch import nn

    from benchmark.errors import UserError
    from benchmark.models import Classifier, insert_after_stage

    model = Classifier(nn.Flatten(), nn.Identity())
    with pytest.raises(UserError, match="exposes no named stages"):
        insert_after_stage(model, "stage2", nn.Identity(), "x")
