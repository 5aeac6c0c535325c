"""DeepLabV3+ configuration."""

from huggingface_hub.dataclasses import strict, validated_field

from .configuration_deeplab import DeepLabConfig, positive, positive_each, probability

# ASPP dilation rates of the method at output stride 8; at stride 16 they halve.
ASPP_RATES_AT_STRIDE_8 = (12, 24, 36)


@strict
class DeepLabV3PlusConfig(DeepLabConfig):
    """Configuration of [`DeepLabV3PlusForSemanticSegmentation`] (docs/method.md §4); the shared fields are
    [`DeepLabConfig`]'s (backbone defaults to `"resnet50"`, output stride to 8, head learning-rate multiplier to 10).

    Args:
        aspp_channels (`int`, defaults to 256): channels of each ASPP branch and of its projection (2048 / 8 in the
            method).
        aspp_rates (`list[int]`, *optional*): dilations of the three 3x3 ASPP branches; None = (12, 24, 36) at output
            stride 8, (6, 12, 18) at 16.
        aspp_dropout (`float`, defaults to 0.5): Dropout2d probability after the ASPP projection.
        low_level_channels (`int`, defaults to 48): channels c1 (layer1) is reduced to before fusion.
        decoder_channels (`int`, defaults to 256): channels of the two 3x3 fuse convs.
        decoder_dropout (`float`, defaults to 0.1): dropout after the fuse convs.
    """

    model_type = "stpp_deeplabv3plus"

    aspp_channels: int = validated_field(positive, default=256)
    aspp_rates: list[int] | tuple[int, ...] | None = validated_field(positive_each(count=3), default=None)
    aspp_dropout: float | int = validated_field(probability, default=0.5)
    low_level_channels: int = validated_field(positive, default=48)
    decoder_channels: int = validated_field(positive, default=256)
    decoder_dropout: float | int = validated_field(probability, default=0.1)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.aspp_rates is not None:
            self.aspp_rates = list(self.aspp_rates)

    @property
    def atrous_rates(self) -> tuple[int, int, int]:
        """The ASPP dilations in use: `aspp_rates`, or the method's rates scaled to the output stride."""
        if self.aspp_rates is not None:
            return tuple(self.aspp_rates)
        return tuple(rate * 8 // self.output_stride for rate in ASPP_RATES_AT_STRIDE_8)


__all__ = ["DeepLabV3PlusConfig"]
