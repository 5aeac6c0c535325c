"""Validation mIoU (docs/method.md §6): argmax of whole-image or sliding-window logits, each process on its shard.

The model is evaluated through an inference copy (:func:`~stpp_hf.training.inference.inference_model`), so a model
under training keeps its mode, memory layout and BatchNorm statistics; the confusion matrices of all processes are
summed, so N processes give the one-process metric.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..metrics import SegmentationMetric
from .distributed import rank_and_world_size
from .inference import autocast, inference_model, pins_memory, same_size_batches, shard_indices, to_device_images


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, sliding_window: tuple[int, int] | None
) -> torch.Tensor:
    """Logits of whole images or of a sliding window.

    Args:
        model: a segmentation model with ``predict_sliding_window``.
        images: normalised pixels ``[B, 3, H, W]`` on the model's device.
        sliding_window: ``(window, stride)`` in pixels, or ``None`` for one forward pass over the whole image.

    Returns:
        Logits ``[B, C, H, W]`` at the input resolution.
    """
    if sliding_window is not None:
        window, stride = sliding_window
        return model.predict_sliding_window(images, window=window, stride=stride)
    return model(pixel_values=images).logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Sequence,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    accelerator=None,
    batch_size: int = 1,
    sliding_window: tuple[int, int] | None = None,
    num_workers: int = 0,
) -> dict:
    """mIoU of ``model`` on ``dataset``, each process on its own shard, under the accelerator's autocast.

    Args:
        model: the (unwrapped) model; it is left as it was.
        dataset: items ``(pixel_values [3, H, W] float32, labels [H, W] int64)`` as ``EvalTransform`` makes them.
        num_classes: classes of the confusion matrix.
        class_names: names for ``per_class_iou`` (default: the class indices).
        accelerator: the run's ``Accelerator`` (device, processes, mixed precision), or ``None`` for one CPU process.
        batch_size: images per forward pass; only consecutive images of one size are stacked.
        sliding_window: ``(window, stride)`` for sliding-window evaluation, or ``None`` for whole images.
        num_workers: DataLoader workers that decode the images (the metric does not depend on them).

    Returns:
        :meth:`~stpp_hf.metrics.SegmentationMetric.compute`'s dictionary (``miou``, ``per_class_iou``,
        ``pixel_accuracy``), identical on every process.
    """
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank, world = rank_and_world_size(accelerator)
    metric = SegmentationMetric(num_classes, class_names)
    folded = None  # an inference copy: the model under training keeps its mode and memory layout
    shard = shard_indices(len(dataset), rank, world)
    for _, images, masks in same_size_batches(dataset, shard, batch_size, num_workers, pins_memory(device)):
        if folded is None:
            folded = inference_model(model, device, images[:1])
        with autocast(accelerator):
            logits = predict_logits(folded, to_device_images(images, device), sliding_window)
        metric.update(logits.argmax(dim=1).cpu(), masks)
    return metric.compute(accelerator)
