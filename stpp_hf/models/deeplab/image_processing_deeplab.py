"""Image processor for the DeepLab models: ImageNet normalisation, full-resolution images (no resize)."""

import torch
import torch.nn.functional as F
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.segformer.image_processing_segformer import SegformerImageProcessor


class DeepLabImageProcessor(SegformerImageProcessor):
    """Rescale to [0, 1] and normalise with the ImageNet mean/std; no resize by default, since the method
    evaluates and pseudo-labels full images (docs/method.md §3). Segmentation maps pass through as int64 `labels`.

    Output: `pixel_values` [B, 3, H, W] (images of one batch must share a size unless `do_resize=True`).
    """

    model_input_names = ["pixel_values"]
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_resize = False
    size = None
    do_reduce_labels = False

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Turn model outputs into class-id maps.

        Args:
            outputs: a model output with `logits` [B, C, H, W] (or the [B, C, H, W] tensor itself, e.g. TTA sums).
            target_sizes: optional (height, width) per image; logits are resized there first
                (bilinear, align_corners=True, like the model's own upsampling).

        Returns:
            B tensors [height, width] of class ids (int64).
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if len(target_sizes) != len(logits):
            raise ValueError(f"target_sizes has {len(target_sizes)} entries but the logits hold {len(logits)} images")
        segmentations = []
        for image_logits, size in zip(logits, target_sizes):
            size = tuple(int(length) for length in size)
            resized = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=True)
            segmentations.append(resized[0].argmax(dim=0))
        return segmentations


__all__ = ["DeepLabImageProcessor"]
