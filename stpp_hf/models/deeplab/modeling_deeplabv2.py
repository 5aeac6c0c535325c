"""DeepLabV2 (four summed dilated 3x3 classifiers) on a dilated timm ResNet, as used by ST / ST++
(docs/method.md §4)."""

import os

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_deeplabv2 import DeepLabV2Config
from .deeplab_common import AtrousConv2d, DeepLabPreTrainedModel, check_state_dict_matches, read_state_dict_file


class DeepLabV2ForSemanticSegmentation(DeepLabPreTrainedModel):
    """DeepLabV2: c4 -> sum of parallel dilated 3x3 convs (with bias, weights N(0, 0.01)) -> upsample.

    The official network names the classifiers `classifier.0` ... `classifier.3`, as here.
    """

    config_class = DeepLabV2Config
    _original_prefix_map = (("backbone.", "backbone."), ("classifier.", "classifier."))

    def __init__(self, config: DeepLabV2Config):
        super().__init__(config)
        _, high_level_in = self._build_backbone(config)
        self.classifier = nn.ModuleList(
            AtrousConv2d(high_level_in, config.num_labels, 3, padding=rate, dilation=rate)
            for rate in config.classifier_rates
        )
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.classifier_init_std)

    def _compute_logits(self, pixel_values: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """features [c1, c4 [B, C4, H/os, W/os]] -> logits [B, num_labels, H, W]."""
        high_level = features[-1]
        logits = sum(classifier(high_level) for classifier in self.classifier)
        return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)

    def load_coco_init(self, path: str | os.PathLike, include_classifier: bool = True) -> None:
        """Initialise from the official COCO-pretrained DeepLabV2-ResNet-101 `.pth` (backbone + classifier keys).

        Set `include_classifier=False` to take only the backbone (e.g. when `num_labels` differs from the file's).
        """
        state_dict = read_state_dict_file(path, "COCO-pretrained DeepLabV2 file")
        what = f"COCO-pretrained DeepLabV2 file {os.fspath(path)}"
        if include_classifier:
            self.load_original_state_dict(state_dict, what)
            return
        converted = self.convert_original_state_dict(state_dict)
        backbone = {key[len("backbone.") :]: value for key, value in converted.items() if key.startswith("backbone.")}
        check_state_dict_matches(backbone, self.backbone.state_dict(), what)
        self.backbone.load_state_dict(backbone)


__all__ = ["DeepLabV2ForSemanticSegmentation"]
