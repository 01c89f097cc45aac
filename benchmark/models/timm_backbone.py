"""Any timm model by name (timm:resnet18 ...), split into extractor and head through timm's API."""
from __future__ import annotations

import torch
from torch import nn

from benchmark.errors import UserError
from benchmark.registry import BACKBONES


class TimmExtractor(nn.Module):
    """A timm model without its classifier: ``forward_features`` then the pooling part of
    ``forward_head`` (``pre_logits=True``).  The embedding is non-negative only when the features
    end in a ReLU (timm's ResNets); EfficientNet (SiLU), ConvNeXt and ViT (a normalisation)
    embeddings can be negative, unlike the paper's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # Models with a pre-logits projection (MobileNetV3's conv_head) pool to head_hidden_size,
        # not to the num_features channels of their last feature map.
        self.embedding_dim = getattr(model, "head_hidden_size", None) or model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@BACKBONES.register("timm:")
def timm_backbone(model_name: str, in_channels: int = 3, image_size: int = 32,
                  **params) -> TimmExtractor:
    """Any timm model, randomly initialised: timm:resnet18, timm:convnext_atto, ..."""
    import timm  # a second of import time that only runs using a timm model should pay
    from timm.models import get_pretrained_cfg

    if not timm.is_model(model_name):
        raise UserError(f"unknown timm model '{model_name}'; "
                        "timm.list_models() lists the valid names")
    # Transformers are built for one input size (224 by default); tell them ours.
    pretrained_cfg = get_pretrained_cfg(model_name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        params.setdefault("img_size", image_size)
    model = timm.create_model(model_name, pretrained=False, num_classes=0,
                              in_chans=in_channels, **params)
    return TimmExtractor(model)
