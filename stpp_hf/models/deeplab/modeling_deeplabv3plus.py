"""DeepLabV3+ (ASPP + low-level decoder) on a dilated timm ResNet, as used by ST / ST++ (docs/method.md §4)."""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_deeplabv3plus import DeepLabV3PlusConfig
from .deeplab_common import ConvNormAct, DeepLabPreTrainedModel


class AtrousSpatialPyramidPooling(nn.Module):
    """ASPP: a 1x1 branch, three dilated 3x3 branches and an image-pooling branch, concatenated and projected.

    [B, in_channels, h, w] -> [B, out_channels, h, w]
    """

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvNormAct(in_channels, out_channels, 1)]
            + [ConvNormAct(in_channels, out_channels, 3, dilation=rate) for rate in rates]
        )
        self.pooling = ConvNormAct(in_channels, out_channels, 1)
        self.project = ConvNormAct((len(rates) + 2) * out_channels, out_channels, 1)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs = [branch(features) for branch in self.branches]
        pooled = self.pooling(F.adaptive_avg_pool2d(features, 1))
        outputs.append(F.interpolate(pooled, size=features.shape[-2:], mode="bilinear", align_corners=True))
        return self.dropout(self.project(torch.cat(outputs, dim=1)))


class DeepLabV3PlusForSemanticSegmentation(DeepLabPreTrainedModel):
    """DeepLabV3+: ASPP on c4, upsampled to c1 and fused with c1 reduced to 48 channels.

    Module names map onto the official ST++ network via `_original_prefix_map`
    (official `head` = ASPP, `reduce`, `fuse`, `classifier`).
    """

    config_class = DeepLabV3PlusConfig
    _original_prefix_map = (
        ("backbone.", "backbone."),
        ("head.b0.0.", "aspp.branches.0.conv."),
        ("head.b0.1.", "aspp.branches.0.norm."),
        ("head.b1.0.", "aspp.branches.1.conv."),
        ("head.b1.1.", "aspp.branches.1.norm."),
        ("head.b2.0.", "aspp.branches.2.conv."),
        ("head.b2.1.", "aspp.branches.2.norm."),
        ("head.b3.0.", "aspp.branches.3.conv."),
        ("head.b3.1.", "aspp.branches.3.norm."),
        ("head.b4.gap.1.", "aspp.pooling.conv."),
        ("head.b4.gap.2.", "aspp.pooling.norm."),
        ("head.project.0.", "aspp.project.conv."),
        ("head.project.1.", "aspp.project.norm."),
        ("reduce.0.", "low_level_reduce.conv."),
        ("reduce.1.", "low_level_reduce.norm."),
        ("fuse.0.", "fuse.0.conv."),
        ("fuse.1.", "fuse.0.norm."),
        ("fuse.3.", "fuse.1.conv."),
        ("fuse.4.", "fuse.1.norm."),
        ("classifier.", "classifier."),
    )

    def __init__(self, config: DeepLabV3PlusConfig):
        super().__init__(config)
        low_level_in, high_level_in = self._build_backbone(config)
        self.aspp = AtrousSpatialPyramidPooling(
            high_level_in, config.aspp_channels, config.atrous_rates, config.aspp_dropout
        )
        self.low_level_reduce = ConvNormAct(low_level_in, config.low_level_channels, 1)
        self.fuse = nn.Sequential(
            ConvNormAct(config.aspp_channels + config.low_level_channels, config.decoder_channels, 3),
            ConvNormAct(config.decoder_channels, config.decoder_channels, 3),
            nn.Dropout(config.decoder_dropout),
        )
        self.classifier = nn.Conv2d(config.decoder_channels, config.num_labels, 1)
        self.post_init()

    def _compute_logits(self, pixel_values: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """features [c1 [B, C1, H/4, W/4], c4 [B, C4, H/os, W/os]] -> logits [B, num_labels, H, W]."""
        low_level, high_level = features
        context = self.aspp(high_level)
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=True)
        fused = self.fuse(torch.cat([self.low_level_reduce(low_level), context], dim=1))
        logits = self.classifier(fused)
        return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)


__all__ = ["DeepLabV3PlusForSemanticSegmentation"]
