"""DeepLabV2 (four summed dilated 3x3 classifiers) on a dilated timm ResNet, as used by ST / ST++
(docs/method.md §4)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_deeplabv2 import DeepLabV2Config
from .deeplab_common import DeepLabPreTrainedModel


class DeepLabV2ForSemanticSegmentation(DeepLabPreTrainedModel):
    """DeepLabV2: c4 -> sum of parallel dilated 3x3 convs (with bias, weights N(0, 0.01)) -> upsample.

    The official network names the classifiers `classifier.0` ... `classifier.3`, as here.
    """

    config_class = DeepLabV2Config

    def __init__(self, config: DeepLabV2Config):
        super().__init__(config)
        _, high_level_in = self._build_backbone(config)
        self.classifier = nn.ModuleList(
            nn.Conv2d(high_level_in, config.num_labels, 3, padding=rate, dilation=rate)
            for rate in config.classifier_rates
        )
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if any(module is classifier for classifier in self.classifier):
            init.normal_(module.weight, mean=0.0, std=self.config.classifier_init_std)

    def _compute_logits(self, pixel_values: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`): the input, for its size.
            features (`list[torch.Tensor]`): the backbone's [c1, c4]; c4 of shape `(batch_size, C4,
                height / output_stride, width / output_stride)`.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_labels, height, width)`: logits at the input resolution.
        """
        high_level = features[-1]
        logits = sum(classifier(high_level) for classifier in self.classifier)
        return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)


__all__ = ["DeepLabV2ForSemanticSegmentation"]
