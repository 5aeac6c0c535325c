"""DeepLabV2 configuration."""

from huggingface_hub.dataclasses import strict, validated_field

from .configuration_deeplab import DeepLabConfig, positive, positive_each


@strict
class DeepLabV2Config(DeepLabConfig):
    """Configuration of [`DeepLabV2ForSemanticSegmentation`] (docs/method.md §4); the shared fields are
    [`DeepLabConfig`]'s, with the method's DeepLabV2 defaults.

    Args:
        backbone (`str`, defaults to `"resnet101"`): the method's, from a COCO-pretrained DeepLabV2.
        output_stride (`int`, defaults to 8): the method's.
        classifier_rates (`list[int]`, defaults to `[6, 12, 18, 24]`): dilations of the parallel 3x3 classifiers whose
            outputs are summed.
        classifier_init_std (`float`, defaults to 0.01): std of the N(0, std) init of those classifiers' weights.
        head_lr_multiplier (`float`, defaults to 1.0): learning-rate multiplier of the classifiers (the method's).
    """

    model_type = "stpp_deeplabv2"

    backbone: str = "resnet101"
    head_lr_multiplier: float | int = validated_field(positive, default=1.0)
    classifier_rates: list[int] | tuple[int, ...] = validated_field(positive_each(), default=(6, 12, 18, 24))
    classifier_init_std: float | int = validated_field(positive, default=0.01)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.classifier_rates = list(self.classifier_rates)
        self.classifier_init_std = float(self.classifier_init_std)


__all__ = ["DeepLabV2Config"]
