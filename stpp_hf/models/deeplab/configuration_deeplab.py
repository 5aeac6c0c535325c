"""The fields shared by the DeepLabV3+ and DeepLabV2 configurations, and the validators of their values.

The configurations are huggingface_hub strict dataclasses, as transformers' are: a field's type and its validator
(:func:`~huggingface_hub.dataclasses.validated_field`) are checked when the config is made and whenever the field is
set, and a bad value raises a ``StrictDataclassFieldValidationError`` naming the field.
"""

from typing import Any, Literal

from huggingface_hub.dataclasses import strict, validated_field
from transformers import PreTrainedConfig
from transformers.utils import logging

from .label_presets import IGNORE_INDEX, get_label_preset
from .timm_backbones import BackboneLayout, backbone_layout

logger = logging.get_logger(__name__)

OUTPUT_STRIDES = (8, 16)


def check_positive_int(name: str, value) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a positive integer (for values that are no field)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def positive(value: int | float) -> None:
    if not value > 0:
        raise ValueError(f"must be positive, got {value!r}")


def probability(value: int | float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1), got {value!r}")


def positive_each(count: int | None = None):
    """A validator of a non-empty list of positive integers (of length ``count`` when given)."""

    def check(values: list[int] | tuple[int, ...] | None) -> None:
        if values is None:
            return
        if not values or (count is not None and len(values) != count):
            raise ValueError(f"must hold {count or 'one or more'} positive integers, got {values!r}")
        for value in values:
            positive(value)

    return check


@strict
class DeepLabConfig(PreTrainedConfig):
    """Fields of both DeepLab configurations.

    Args:
        num_labels (`int`, *optional*): number of classes; 21 (Pascal VOC) unless `id2label` is given. An explicit
            `num_labels` that disagrees with `id2label` wins, as in transformers (`from_pretrained(path,
            num_labels=5)` to fine-tune), with generic class names and a warning.
        backbone (`str`): timm architecture that yields feature maps: the method's ResNets ("resnet50",
            "resnet101", ...) or another CNN ("convnext_base", "efficientnet_b3", ...) or a ViT
            ("vit_base_patch14_dinov2"); see `timm_backbones.py`. Its weights are loaded explicitly afterwards.
        output_stride (`int`): 8 (the method: layer3 / layer4 dilated) or 16 (faster). A ViT's maps are resampled
            to it.
        backbone_out_indices (`list[int]`, *optional*): timm feature levels (a ViT: blocks) of the [low-level,
            high-level] maps; None = the level nearest stride 4 and the deepest (a ViT: the block at a quarter of
            its depth and the last).
        backbone_kwargs (`dict`, *optional*): further `timm.create_model` arguments of the backbone (JSON values,
            e.g. `{"img_size": 224}`, `{"drop_path_rate": 0.1}`).
        head_lr_multiplier (`float`): learning-rate multiplier of everything but the backbone.
        semantic_loss_ignore_index (`int`, defaults to 255): label value ignored by the loss.
    """

    backbone: str = "resnet50"
    output_stride: Literal[OUTPUT_STRIDES] = 8
    backbone_out_indices: list[int] | tuple[int, ...] | None = None
    backbone_kwargs: dict[str, Any] | None = None
    head_lr_multiplier: float | int = validated_field(positive, default=10.0)
    semantic_loss_ignore_index: int = IGNORE_INDEX

    def __post_init__(self, **kwargs):
        # `num_labels` is not a field: transformers derives it from `id2label`.
        num_labels = kwargs.pop("num_labels", None)
        if self.id2label is not None and num_labels is not None and num_labels != len(self.id2label):
            logger.warning(
                f"num_labels={num_labels} replaces the {len(self.id2label)} class names of id2label "
                "with generic ones (LABEL_0, ...)"
            )
            self.id2label = self.label2id = None
        if self.id2label is None:
            num_labels = 21 if num_labels is None else num_labels
            check_positive_int("num_labels", num_labels)
            kwargs["num_labels"] = num_labels
        super().__post_init__(**kwargs)
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(f"id2label keys must be 0..{len(self.id2label) - 1}, got {sorted(self.id2label)}")
        if self.label2id is None:
            self.label2id = {name: index for index, name in self.id2label.items()}
        if self.backbone_out_indices is not None:
            self.backbone_out_indices = list(self.backbone_out_indices)
        self.backbone_layout()  # checks the backbone now: a ValueError names the option that cannot work
        self.head_lr_multiplier = float(self.head_lr_multiplier)

    def backbone_layout(self) -> BackboneLayout:
        """The backbone's feature levels and channels, from the backbone fields (cached; builds no weights)."""
        return backbone_layout(self.backbone, self.output_stride, self.backbone_out_indices, self.backbone_kwargs)

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "DeepLabConfig":
        """A config with the class names of a dataset preset (`"pascal_voc"`: 21 classes, `"cityscapes"`: 19)."""
        label_preset = get_label_preset(preset)
        if kwargs.pop("num_labels", label_preset.num_labels) != label_preset.num_labels:
            raise ValueError(f"num_labels must be {label_preset.num_labels} for preset {preset!r}")
        return cls(id2label=label_preset.id2label, **kwargs)


__all__ = ["DeepLabConfig"]
