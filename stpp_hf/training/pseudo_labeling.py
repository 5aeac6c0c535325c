"""TTA pseudo-labeling of unlabeled images (docs/method.md §5), batched and sharded across processes.

Only the ids the store does not hold yet are labeled, so a relaunch after a kill completes a
partial store. Each process labels a disjoint shard and writes its labels itself (the store's writes
are atomic per file); the stage then checks the whole store and, where true masks exist, reports the
pseudo labels' mIoU against them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..metrics import SegmentationMetric
from ..models.deeplab.deeplab_common import TTA_SCALES
from .distributed import rank_and_world_size
from .inference import (
    autocast,
    inference_model,
    pins_memory,
    same_size_batches,
    shard_indices,
    shard_items,
    to_device_images,
)
from .label_writer import BackgroundLabelWriter

# Elements of the largest-scale maps of one TTA pass ([2 x images, classes, 2H, 2W] at scale 2 with the flips): a
# quarter of INT_MAX, the most elements CUDA's channels-last bilinear upsample takes, and 2 GiB per such map in fp32.
# A Pascal batch of 8 images (at most 500 px a side, 21 classes) stays whole; a 1024x2048 Cityscapes image is one pass.
TTA_ELEMENTS_BUDGET = 2**29
MAX_LABEL_CLASSES = 256  # the pseudo labels are 8-bit PNGs


def tta_images_per_pass(height: int, width: int, num_classes: int, budget: int | None = None) -> int:
    """Images of ``height`` x ``width`` that one TTA pass takes so that its largest maps (the upsampled logits and
    softmax of the largest scale, flipped copies included) hold at most ``budget`` elements
    (:data:`TTA_ELEMENTS_BUDGET`); at least one."""
    budget = TTA_ELEMENTS_BUDGET if budget is None else budget
    largest = max(int(height * scale) * int(width * scale) for scale in TTA_SCALES)
    return max(1, budget // (2 * num_classes * largest))


@torch.no_grad()
def tta_pseudo_labels(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pseudo labels ``[B, H, W]`` (uint8, on the CPU) for ``images`` ``[B, 3, H, W]``: argmax of the summed
    softmax over 5 scales x {identity, horizontal flip} (``model.predict_tta``), in passes of
    :func:`tta_images_per_pass` images. The argmax maps cross to the host as 8 bits, an eighth of int64's."""
    num_classes = model.config.num_labels
    if num_classes > MAX_LABEL_CLASSES:
        raise ValueError(
            f"pseudo labels are 8-bit PNGs: at most {MAX_LABEL_CLASSES} classes, the model has {num_classes}"
        )
    per_pass = tta_images_per_pass(*images.shape[-2:], num_classes)
    labels = [
        model.predict_tta(part, scales=TTA_SCALES, flip=True).argmax(dim=1).to(torch.uint8).cpu()
        for part in images.split(per_pass)
    ]
    return labels[0] if len(labels) == 1 else torch.cat(labels)


@torch.no_grad()
def label_images(
    model: torch.nn.Module,
    dataset: Sequence,
    ids: Sequence[str],
    store,
    accelerator=None,
    batch_size: int = 4,
    progress=None,
    num_workers: int = 0,
) -> int:
    """Write TTA pseudo labels of the ids that ``store`` still lacks; returns how many this process wrote.

    ``dataset[i] = (image [3,H,W], mask | None)`` is the image whose id is ``ids[i]``. The network runs
    under ``accelerator.autocast()``, i.e. in the run's mixed precision; ``num_workers`` DataLoader workers
    decode the images (the labels do not depend on them).
    """
    if len(dataset) != len(ids):
        raise ValueError(f"dataset has {len(dataset)} items but {len(ids)} ids were given")
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank, world = rank_and_world_size(accelerator)
    # shard the full id list (not just the pending ids, which other processes are already changing)
    my_indices = shard_indices(len(ids), rank, world)
    pending = set(store.pending([ids[index] for index in my_indices]))
    my_indices = [index for index in my_indices if ids[index] in pending]
    written = 0
    folded = None
    with BackgroundLabelWriter(store) as writer:  # PNG encoding and fsync overlap the next batch
        for indices, images, _ in same_size_batches(dataset, my_indices, batch_size, num_workers, pins_memory(device)):
            if folded is None:
                folded = inference_model(model, device, images[:1])
            with autocast(accelerator):  # bf16 / fp16 under mixed precision; the softmax sum stays float32
                labels = tta_pseudo_labels(folded, to_device_images(images, device))
            for index, label in zip(indices, labels):
                writer.put(ids[index], label.numpy())
            written += len(indices)
            if progress is not None:
                progress.update(len(indices) * world)
    return written


def pseudo_label_miou(
    store, dataset: Sequence, ids: Sequence[str], num_classes: int, accelerator=None, num_workers: int = 0
) -> float | None:
    """mIoU of the stored pseudo labels of ``ids`` against the true masks (``None`` without masks); ``num_workers``
    DataLoader workers read ``dataset``."""
    rank, world = rank_and_world_size(accelerator)
    metric = SegmentationMetric(num_classes)
    has_masks = torch.zeros(1, dtype=torch.int64)
    for index, (_, mask) in shard_items(dataset, shard_indices(len(ids), rank, world), num_workers):
        if mask is None:
            continue
        has_masks += 1
        metric.update(torch.from_numpy(store.get(ids[index]).astype(np.int64)), mask)
    if accelerator is not None and world > 1:
        has_masks = accelerator.reduce(has_masks.to(accelerator.device), reduction="sum").cpu()
    result = metric.compute(accelerator)
    return result["miou"] if int(has_masks) else None
