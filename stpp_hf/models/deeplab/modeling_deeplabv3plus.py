"""DeepLabV3+ (ASPP + low-level decoder) on a dilated timm ResNet, as used by ST / ST++ (docs/method.md §4)."""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_deeplabv3plus import DeepLabV3PlusConfig
from .deeplab_common import DeepLabPreTrainedModel


class ConvNormAct(nn.Sequential):
    """Bias-free conv -> BatchNorm -> ReLU, the building block of the DeepLabV3+ head ("same" padding, stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class AtrousSpatialPyramidPooling(nn.Module):
    """ASPP: a 1x1 branch, three dilated 3x3 branches and an image-pooling branch, concatenated and projected."""

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
        """
        Args:
            features (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): c4.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_channels, height, width)`.
        """
        outputs = [branch(features) for branch in self.branches]
        pooled = self.pooling(F.adaptive_avg_pool2d(features, 1))
        outputs.append(F.interpolate(pooled, size=features.shape[-2:], mode="bilinear", align_corners=True))
        return self.dropout(self.project(torch.cat(outputs, dim=1)))


class DeepLabV3PlusForSemanticSegmentation(DeepLabPreTrainedModel):
    """DeepLabV3+: ASPP on c4, upsampled to c1 and fused with c1 reduced to 48 channels.

    Its module names differ from the official ST++ network's (`head` = ASPP, `reduce`, `fuse`, `classifier`):
    `stpp_hf.convert_original` maps official checkpoints onto them.
    """

    config_class = DeepLabV3PlusConfig

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
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`): the input, for its size.
            features (`list[torch.Tensor]`): the backbone's c1 `(batch_size, C1, height / 4, width / 4)` and c4
                `(batch_size, C4, height / output_stride, width / output_stride)`.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_labels, height, width)`: logits at the input resolution.
        """
        low_level, high_level = features
        context = self.aspp(high_level)
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=True)
        fused = self.fuse(torch.cat([self.low_level_reduce(low_level), context], dim=1))
        logits = self.classifier(fused)
        return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)


__all__ = ["DeepLabV3PlusForSemanticSegmentation"]
