"""Batched, sharded full-image inference shared by evaluation, selection and pseudo-labeling.

Each process takes a disjoint shard ``indices[rank::world_size]`` of the set (no padding, unlike a
prepared DataLoader), so results summed or gathered over processes equal a single-process pass.
Consecutive images of the same size are stacked into one batch; different sizes never are, so no
image is resized or padded and every prediction equals the one-image-at-a-time reference.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


def shard_indices(num_items: int, process_index: int, num_processes: int) -> list[int]:
    """The indices of ``range(num_items)`` that process ``process_index`` handles."""
    return list(range(process_index, num_items, num_processes))


def same_size_batches(
    dataset: Sequence, indices: Sequence[int], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Yield ``(indices, images [B,3,H,W], masks [B,H,W] | None)`` from ``dataset[i] = (image, mask)``.

    A batch ends at ``batch_size`` items or when the next image has another size. Masks are ``None``
    for a batch where any mask is missing (unlabeled images).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    def flush():
        images = torch.stack([image for _, image, _ in pending])
        masks = None if any(mask is None for _, _, mask in pending) else torch.stack([m for _, _, m in pending])
        return [index for index, _, _ in pending], images, masks

    for index in indices:
        image, mask = dataset[index]
        if pending and (len(pending) == batch_size or pending[0][1].shape != image.shape):
            yield flush()
            pending = []
        pending.append((index, image, mask))
    if pending:
        yield flush()


def prepare_for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode on ``device`` in channels_last memory format (faster convolutions, same math)."""
    model = model.to(device).eval()
    if device.type == "cpu" or device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
