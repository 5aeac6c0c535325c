"""Model inputs from 8-bit RGB pixels: the image processor's rescale to [0, 1] and ImageNet normalisation.

The mean / std are :class:`~stpp_hf.models.DeepLabImageProcessor`'s defaults (transformers' ImageNet constants),
so training, evaluation and a saved model's processor normalise alike. ``(x / 255 - mean) / std`` is computed as
one multiply and one subtract per element with the constants folded in float64, the same operations on a single
image (:func:`normalize`) and on a batch on any device (:func:`normalize_batch`): on CPU both give the same bits.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from ..models.deeplab.image_processing_deeplab import DeepLabImageProcessor

IMAGENET_MEAN = tuple(DeepLabImageProcessor.image_mean)
IMAGENET_STD = tuple(DeepLabImageProcessor.image_std)

_PIXEL_SCALE = torch.tensor([1 / (255 * std) for std in IMAGENET_STD]).view(3, 1, 1)
_PIXEL_SHIFT = torch.tensor([mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


@functools.lru_cache(maxsize=None)
def _pixel_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # one copy per device, not a host-to-device transfer per batch
    return _PIXEL_SCALE.to(device), _PIXEL_SHIFT.to(device)


def _normalized(pixels: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` uint8 -> contiguous float32 on the same device: one conversion pass (which
    also gathers a PIL image's channel-interleaved pixels) and two in-place passes."""
    scale, shift = _pixel_constants(pixels.device)
    normalized = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device).copy_(pixels)
    return normalized.mul_(scale).sub_(shift)


def normalize(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise one image.

    Args:
        image: an RGB PIL image or a ``[3, H, W]`` uint8 tensor.

    Returns:
        ``[3, H, W]`` float32, equal to ``(x / 255 - mean) / std`` up to float32 rounding (a few 1e-7).
    """
    return _normalized(F.pil_to_tensor(image) if isinstance(image, Image.Image) else image)


def normalize_batch(pixels: torch.Tensor) -> torch.Tensor:
    """The model input made of a batch of training items (:class:`~stpp_hf.data.TrainTransform` pixels).

    Args:
        pixels: ``[B, 3, H, W]`` uint8 on any device.

    Returns:
        ``[B, 3, H, W]`` float32 ImageNet-normalised on the same device; on CPU each image equals
        :func:`normalize` of it bit for bit.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected a [B, 3, H, W] uint8 batch, got {tuple(pixels.shape)} {pixels.dtype}")
    return _normalized(pixels)
