"""ST / ST++ self-training for semi-supervised semantic segmentation on the Hugging Face stack.

Importing the package registers its models with transformers' Auto classes.
"""

from .models import (
    MODEL_REGISTRY,
    DeepLabImageProcessor,
    DeepLabV2Config,
    DeepLabV2ForSemanticSegmentation,
    DeepLabV3PlusConfig,
    DeepLabV3PlusForSemanticSegmentation,
    build_model,
)

__version__ = "0.1.0"

__all__ = [
    "MODEL_REGISTRY",
    "DeepLabImageProcessor",
    "DeepLabV2Config",
    "DeepLabV2ForSemanticSegmentation",
    "DeepLabV3PlusConfig",
    "DeepLabV3PlusForSemanticSegmentation",
    "build_model",
]
