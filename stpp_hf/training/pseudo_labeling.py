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


@torch.no_grad()
def tta_pseudo_labels(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pseudo labels ``[B, H, W]`` (int64) for ``images`` ``[B, 3, H, W]``: argmax of the summed
    softmax over 5 scales x {identity, horizontal flip} (``model.predict_tta``)."""
    return model.predict_tta(images, scales=TTA_SCALES, flip=True).argmax(dim=1).cpu()


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
    for indices, images, _ in same_size_batches(dataset, my_indices, batch_size, num_workers, pins_memory(device)):
        if folded is None:
            folded = inference_model(model, device, images[:1])
        with autocast(accelerator):  # bf16 / fp16 under mixed precision; the softmax sum stays float32
            labels = tta_pseudo_labels(folded, to_device_images(images, device))
        for index, label in zip(indices, labels):
            store.put(ids[index], label.to(torch.uint8).numpy())
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
