"""The segmentation models of ST / ST++ as transformers models, registered with the Auto classes.

`MODEL_REGISTRY` maps the names used in configs and on the command line to (config class, model class).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, PreTrainedModel

from .deeplab.configuration_deeplabv2 import DeepLabV2Config
from .deeplab.configuration_deeplabv3plus import DeepLabV3PlusConfig
from .deeplab.image_processing_deeplab import DeepLabImageProcessor
from .deeplab.label_presets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    LABEL_PRESETS,
    PASCAL_VOC_CLASSES,
    PASCAL_VOC_PALETTE,
    LabelPreset,
    colorize,
    flat_palette,
    get_label_preset,
)
from .deeplab.modeling_deeplabv2 import DeepLabV2ForSemanticSegmentation
from .deeplab.modeling_deeplabv3plus import DeepLabV3PlusForSemanticSegmentation

MODEL_REGISTRY = {
    "deeplabv3plus": (DeepLabV3PlusConfig, DeepLabV3PlusForSemanticSegmentation),
    "deeplabv2": (DeepLabV2Config, DeepLabV2ForSemanticSegmentation),
}

for _config_class, _model_class in MODEL_REGISTRY.values():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForSemanticSegmentation.register(_config_class, _model_class, exist_ok=True)
    AutoImageProcessor.register(
        _config_class, image_processor_classes={"torchvision": DeepLabImageProcessor}, exist_ok=True
    )
    # save_pretrained then writes auto_map + the code files, so trust_remote_code works without this package.
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForSemanticSegmentation")
DeepLabImageProcessor.register_for_auto_class("AutoImageProcessor")


def build_model(name: str, **config_kwargs) -> PreTrainedModel:
    """A freshly initialised model: `build_model("deeplabv3plus", backbone="resnet50", num_labels=21)`.

    Pass `preset="pascal_voc"` / `"cityscapes"` to take the class names of that dataset.
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"Unknown model {name!r}; allowed values: {sorted(MODEL_REGISTRY)}")
    config_class, model_class = MODEL_REGISTRY[name]
    preset = config_kwargs.pop("preset", None)
    config = config_class.from_preset(preset, **config_kwargs) if preset else config_class(**config_kwargs)
    return model_class(config)


__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "LABEL_PRESETS",
    "MODEL_REGISTRY",
    "PASCAL_VOC_CLASSES",
    "PASCAL_VOC_PALETTE",
    "DeepLabImageProcessor",
    "DeepLabV2Config",
    "DeepLabV2ForSemanticSegmentation",
    "DeepLabV3PlusConfig",
    "DeepLabV3PlusForSemanticSegmentation",
    "LabelPreset",
    "build_model",
    "colorize",
    "flat_palette",
    "get_label_preset",
]
