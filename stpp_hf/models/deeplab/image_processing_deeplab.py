"""Image processor for the DeepLab models: ImageNet normalisation, full-resolution images (no resize)."""

import torch
import torch.nn.functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.segformer.image_processing_segformer import SegformerImageProcessor


class DeepLabImageProcessor(SegformerImageProcessor):
    """Rescale to [0, 1] and normalise with the ImageNet mean/std; no resize by default, since the method
    evaluates and pseudo-labels full images (docs/method.md §3). Segmentation maps pass through as int64 `labels`.

    Output: `pixel_values` of shape `(batch_size, 3, height, width)` (the images of one batch must share a size
    unless `do_resize=True`).
    """

    model_input_names = ["pixel_values"]
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_resize = False
    size = None
    do_reduce_labels = False

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """Turn model outputs into class-id maps, as the parent does, but resizing like the model's own upsampling
        (bilinear, align_corners=True).

        Args:
            outputs (`SemanticSegmenterOutput` or `torch.Tensor`): a model output with `logits` of shape
                `(batch_size, num_labels, height, width)`, or such a tensor itself (e.g. `predict_tta`'s sums).
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `(batch_size, 2)`, *optional*):
                (height, width) per image; the logits are resized there first.
            return_segmentation_scores (`bool`, defaults to `False`): also return each image's (resized) scores.

        Returns:
            `list[torch.Tensor]`: one class-id map (int64) of shape `(height, width)` per image; with
            `return_segmentation_scores=True`, one `SemanticSegmentationPostProcessorOutput` per image instead
            (`segmentation`, and `segmentation_scores` of shape `(num_labels, height, width)`).
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        if target_sizes is not None:
            if len(target_sizes) != len(logits):
                raise ValueError(
                    f"target_sizes has {len(target_sizes)} entries but the logits hold {len(logits)} images"
                )
            logits = [
                F.interpolate(
                    image_logits[None], size=[int(length) for length in size], mode="bilinear", align_corners=True
                )[0]
                for image_logits, size in zip(logits, target_sizes)
            ]
        # The parent's argmax and output objects, image by image (the sizes may differ).
        post_process = super().post_process_semantic_segmentation
        return [
            post_process(SemanticSegmenterOutput(logits=image_logits[None]), None, return_segmentation_scores)[0]
            for image_logits in logits
        ]


__all__ = ["DeepLabImageProcessor"]
