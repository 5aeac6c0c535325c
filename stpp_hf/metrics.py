"""Streaming confusion-matrix mIoU (docs/method.md §6), summed across processes.

The metric is a ``[C, C]`` int64 confusion matrix ``hist[gt, pred]`` over the pixels whose ground
truth lies in ``[0, C)``; 255 and any other out-of-range value are ignored. Per-class IoU is
``diag / (row_sum + col_sum - diag)`` and mIoU is its NaN-mean (classes absent from both prediction
and ground truth are NaN). Val mIoU accumulates one matrix over the whole set, not a mean of
per-image scores; :func:`per_image_miou` is the per-image score used by reliable-image selection.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix of one or many label maps.

    Args:
        predictions: integer tensor of any shape (e.g. ``[B, H, W]``), predicted class per pixel.
        targets: integer tensor of the same shape, ground truth; values outside ``[0, C)`` are ignored.
        num_classes: ``C``.

    Returns:
        int64 tensor ``[C, C]`` with ``hist[gt, pred]`` pixel counts, on the inputs' device.
    """
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions and targets must have the same shape, got {tuple(predictions.shape)} "
            f"and {tuple(targets.shape)}"
        )
    targets = targets.reshape(-1).long()
    predictions = predictions.reshape(-1).long()
    valid = (targets >= 0) & (targets < num_classes)
    flat_index = num_classes * targets[valid] + predictions[valid]
    # predictions outside [0, C) would silently land in another cell: they are a caller bug.
    if flat_index.numel() and (predictions[valid].min() < 0 or predictions[valid].max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes}), got values outside that range")
    return torch.bincount(flat_index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(hist: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``[C]`` (float64, NaN for classes absent from both prediction and ground truth)."""
    hist = hist.double()
    diag = torch.diagonal(hist)
    union = hist.sum(dim=1) + hist.sum(dim=0) - diag
    return diag / union  # 0/0 -> NaN on purpose: those classes are left out of the mean


def nanmean(values: torch.Tensor) -> float:
    """Mean over the non-NaN entries; NaN when every entry is NaN."""
    present = values[~torch.isnan(values)]
    return float(present.mean()) if present.numel() else math.nan


def per_image_miou(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """mIoU of one image (``[H, W]`` label maps) with the docs/method.md §6 metric."""
    return nanmean(iou_from_confusion(confusion_matrix(prediction, target, num_classes)))


class SegmentationMetric:
    """Streaming mIoU / per-class IoU / pixel accuracy over a whole evaluation set.

    Args:
        num_classes: number of classes ``C``.
        class_names: optional names for the per-class IoU dictionary (``id2label`` order).

    Call :meth:`update` per batch, then :meth:`compute` with the ``Accelerator`` (or ``None`` for a
    single process): the matrices of all processes are summed, so N processes that each evaluate a
    disjoint shard give exactly the number one process gives on the whole set.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | Mapping[int, str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        if class_names is None:
            self.class_names = [str(index) for index in range(num_classes)]
        elif isinstance(class_names, Mapping):
            self.class_names = [str(class_names[index]) for index in range(num_classes)]
        else:
            if len(class_names) != num_classes:
                raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
            self.class_names = [str(name) for name in class_names]
        self.hist = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.hist.zero_()

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """Add label maps ``[B, H, W]`` (or ``[H, W]``); targets outside ``[0, C)`` are ignored."""
        self.hist += confusion_matrix(predictions.detach(), targets.detach(), self.num_classes).cpu()

    def synchronized_confusion(self, accelerator=None) -> torch.Tensor:
        """The confusion matrix summed over all processes (every process must call this)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.hist.clone()
        hist = self.hist.to(accelerator.device)
        return accelerator.reduce(hist, reduction="sum").cpu()

    def compute(self, accelerator=None) -> dict:
        """Returns ``{"miou", "pixel_accuracy", "per_class_iou": {name: iou}, "confusion_matrix"}`` over all
        processes; ``confusion_matrix`` is the summed ``[C, C]`` matrix as nested lists of pixel counts
        (``[gt][pred]``), kept for the run's pictures.

        Classes that never appear (NaN IoU) are reported as ``None`` in ``per_class_iou`` so the
        result stays JSON-serialisable.
        """
        hist = self.synchronized_confusion(accelerator)
        iou = iou_from_confusion(hist)
        total = int(hist.sum())
        return {
            "miou": nanmean(iou),
            "pixel_accuracy": float(torch.diagonal(hist).sum()) / total if total else math.nan,
            "per_class_iou": {
                name: (None if math.isnan(value) else value) for name, value in zip(self.class_names, iou.tolist())
            },
            "confusion_matrix": hist.tolist(),
        }


def format_per_class_iou(per_class_iou: Mapping[str, float | None]) -> str:
    """One log line such as ``background 93.1 | circle 71.0 | square n/a``."""
    return " | ".join(
        f"{name} {'n/a' if value is None else f'{100 * value:.1f}'}" for name, value in per_class_iou.items()
    )
