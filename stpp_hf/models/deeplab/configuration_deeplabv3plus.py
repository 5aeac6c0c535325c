"""DeepLabV3+ configuration."""

from transformers import PreTrainedConfig

from .deeplab_common import DeepLabConfigMixin, require_positive_int, require_positive_number, require_probability

# ASPP dilation rates of the method at output stride 8; at stride 16 they halve.
ASPP_RATES_AT_STRIDE_8 = (12, 24, 36)


class DeepLabV3PlusConfig(DeepLabConfigMixin, PreTrainedConfig):
    """Configuration of [`DeepLabV3PlusForSemanticSegmentation`] (docs/method.md §4).

    Args:
        num_labels: number of classes (default 21, Pascal VOC, unless `id2label` is given).
        backbone: timm ResNet-family name ("resnet50", "resnet101", "resnet18", "resnet50d", ...).
        output_stride: 8 (the method: layer3/layer4 dilated) or 16 (faster).
        aspp_channels: channels of each ASPP branch and of its projection (256 = 2048 / 8 in the method).
        aspp_rates: dilations of the three 3x3 ASPP branches; None = (12, 24, 36) at stride 8, (6, 12, 18) at 16.
        aspp_dropout: Dropout2d probability after the ASPP projection.
        low_level_channels: channels c1 (layer1) is reduced to before fusion.
        decoder_channels: channels of the two 3x3 fuse convs.
        decoder_dropout: dropout after the fuse convs.
        head_lr_multiplier: learning-rate multiplier of everything but the backbone (10 in the method).
        semantic_loss_ignore_index: label value ignored by the loss (255).
    """

    model_type = "stpp_deeplabv3plus"

    def __init__(
        self,
        num_labels: int | None = None,
        backbone: str = "resnet50",
        output_stride: int = 8,
        aspp_channels: int = 256,
        aspp_rates: list[int] | None = None,
        aspp_dropout: float = 0.5,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        decoder_dropout: float = 0.1,
        head_lr_multiplier: float = 10.0,
        **kwargs,
    ):
        kwargs = self._init_labels_and_backbone(backbone, output_stride, num_labels, kwargs)
        for field, value in (
            ("aspp_channels", aspp_channels),
            ("low_level_channels", low_level_channels),
            ("decoder_channels", decoder_channels),
        ):
            require_positive_int(field, value)
        if aspp_rates is not None:
            aspp_rates = list(aspp_rates)
            if len(aspp_rates) != 3:
                raise ValueError(
                    f"aspp_rates={aspp_rates!r} is invalid; allowed values: None or three positive integers"
                )
            for rate in aspp_rates:
                require_positive_int("aspp_rates", rate)
        require_probability("aspp_dropout", aspp_dropout)
        require_probability("decoder_dropout", decoder_dropout)
        require_positive_number("head_lr_multiplier", head_lr_multiplier)
        self.aspp_channels = aspp_channels
        self.aspp_rates = aspp_rates
        self.aspp_dropout = aspp_dropout
        self.low_level_channels = low_level_channels
        self.decoder_channels = decoder_channels
        self.decoder_dropout = decoder_dropout
        self.head_lr_multiplier = float(head_lr_multiplier)
        super().__init__(**kwargs)

    @property
    def atrous_rates(self) -> tuple[int, int, int]:
        """The ASPP dilations in use: `aspp_rates`, or the method's rates scaled to the output stride."""
        if self.aspp_rates is not None:
            return tuple(self.aspp_rates)
        return tuple(rate * 8 // self.output_stride for rate in ASPP_RATES_AT_STRIDE_8)
