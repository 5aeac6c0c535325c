"""DeepLabV2 configuration."""

from transformers import PreTrainedConfig

from .deeplab_common import DeepLabConfigMixin, require_positive_int, require_positive_number


class DeepLabV2Config(DeepLabConfigMixin, PreTrainedConfig):
    """Configuration of [`DeepLabV2ForSemanticSegmentation`] (docs/method.md §4).

    Args:
        num_labels: number of classes (default 21, Pascal VOC, unless `id2label` is given).
        backbone: timm ResNet-family name (the method uses "resnet101", from a COCO-pretrained DeepLabV2).
        output_stride: 8 (the method) or 16.
        classifier_rates: dilations of the parallel 3x3 classifiers whose outputs are summed.
        classifier_init_std: std of the N(0, std) init of those classifiers' weights.
        head_lr_multiplier: learning-rate multiplier of the classifiers (1 in the method).
        semantic_loss_ignore_index: label value ignored by the loss (255).
    """

    model_type = "stpp_deeplabv2"

    def __init__(
        self,
        num_labels: int | None = None,
        backbone: str = "resnet101",
        output_stride: int = 8,
        classifier_rates: list[int] = (6, 12, 18, 24),
        classifier_init_std: float = 0.01,
        head_lr_multiplier: float = 1.0,
        **kwargs,
    ):
        kwargs = self._init_labels_and_backbone(backbone, output_stride, num_labels, kwargs)
        classifier_rates = list(classifier_rates)
        if not classifier_rates:
            raise ValueError("classifier_rates=[] is invalid; allowed values: one or more positive integers")
        for rate in classifier_rates:
            require_positive_int("classifier_rates", rate)
        require_positive_number("classifier_init_std", classifier_init_std)
        require_positive_number("head_lr_multiplier", head_lr_multiplier)
        self.classifier_rates = classifier_rates
        self.classifier_init_std = float(classifier_init_std)
        self.head_lr_multiplier = float(head_lr_multiplier)
        super().__init__(**kwargs)
