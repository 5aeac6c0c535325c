"""Reliable-image selection (docs/method.md §1, ST++ step 2).

For each unlabeled image every SupOnly snapshot predicts an argmax map (full image, no TTA); the
image's reliability is the mean over the earlier snapshots of the per-image mIoU between their
prediction and the last snapshot's, which plays the ground truth. Images sorted by reliability
(highest first, ties keep the unlabeled list's order like Python's stable sort in the reference):
the first ``N // 2`` are reliable.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from accelerate.utils import gather_object

from ..metrics import per_image_miou
from .distributed import rank_and_world_size
from .inference import autocast, inference_model, pins_memory, same_size_batches, shard_indices, to_device_images


@torch.no_grad()
def snapshot_predictions(snapshots: Sequence[torch.nn.Module], images: torch.Tensor) -> list[torch.Tensor]:
    """Argmax maps ``[B, H, W]`` of every snapshot for ``images`` ``[B, 3, H, W]``."""
    return [snapshot(pixel_values=images).logits.argmax(dim=1).cpu() for snapshot in snapshots]


def reliability_of_predictions(predictions: Sequence[torch.Tensor], num_classes: int) -> list[float]:
    """Per-image reliability from the snapshots' argmax maps (each ``[B, H, W]``, last one = reference)."""
    if len(predictions) < 2:
        raise ValueError(f"reliability needs at least 2 snapshots, got {len(predictions)}")
    reference = predictions[-1]
    scores = []
    for image_index in range(reference.shape[0]):
        ious = [
            per_image_miou(earlier[image_index], reference[image_index], num_classes) for earlier in predictions[:-1]
        ]
        scores.append(sum(ious) / len(ious))
    return scores


@torch.no_grad()
def compute_reliability(
    snapshots: Sequence[torch.nn.Module],
    dataset: Sequence,
    ids: Sequence[str],
    num_classes: int,
    accelerator=None,
    batch_size: int = 8,
    progress=None,
    num_workers: int = 0,
) -> dict[str, float]:
    """``{id: reliability}`` for every image of ``dataset`` (``dataset[i] = (image, mask|None)``, id ``ids[i]``).

    Each process scores its shard with all snapshots at once; the scores are gathered so every
    process returns the full dictionary. ``num_workers`` DataLoader workers decode the images (the scores do
    not depend on them).
    """
    if len(dataset) != len(ids):
        raise ValueError(f"dataset has {len(dataset)} items but {len(ids)} ids were given")
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank, world = rank_and_world_size(accelerator)
    local_scores = []
    folded = None
    shard = shard_indices(len(ids), rank, world)
    for indices, images, _ in same_size_batches(dataset, shard, batch_size, num_workers, pins_memory(device)):
        if folded is None:
            folded = [inference_model(snapshot, device, images[:1]) for snapshot in snapshots]
        with autocast(accelerator):  # the run's mixed precision
            predictions = snapshot_predictions(folded, to_device_images(images, device))
        for index, score in zip(indices, reliability_of_predictions(predictions, num_classes)):
            local_scores.append((ids[index], score))
        if progress is not None:
            progress.update(len(indices) * world)
    gathered = gather_object(local_scores) if world > 1 else local_scores
    return dict(gathered)


def split_by_reliability(scores: Mapping[str, float], ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(reliable, unreliable)`` id lists: ``ids`` sorted by score (stable, highest first), split at ``N//2``."""
    missing = [image_id for image_id in ids if image_id not in scores]
    if missing:
        raise ValueError(f"no reliability score for {len(missing)} ids, e.g. {missing[:3]}")
    ranked = sorted(ids, key=lambda image_id: scores[image_id], reverse=True)
    half = len(ranked) // 2
    return ranked[:half], ranked[half:]
