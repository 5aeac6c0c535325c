"""The method's joint image / mask augmentations (docs/method.md §3), written plainly with PIL and
``torchvision.transforms.v2``.

:class:`TrainTransform` is the definition; training runs :class:`~stpp_hf.data.fast_transforms.FastTrainTransform`,
which draws the same random numbers and gives the same bytes faster (tests/test_transforms.py compares the two).
Masks are only ever indexed (nearest resize, padding, crop, flip), so class indices are never interpolated.
Randomness comes only from torch's global CPU generator (v2 transforms draw from it too);
:class:`~stpp_hf.training.sampling.SeededItems` seeds it per item, so an item's augmentations do not depend on
the DataLoader worker or process that makes it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..models.deeplab.label_presets import IGNORE_INDEX
from .images import MASK_MODES, rgb_image
from .normalization import normalize


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """An integer drawn uniformly from ``[low, high]`` (both ends included)."""
    return int(torch.randint(low, high + 1, ()).item())


def check_mask(mask: Image.Image, image_size: tuple[int, int]) -> None:
    """Raise unless ``mask`` holds class indices in a single-channel image of ``image_size`` ``(W, H)``."""
    if mask.mode not in MASK_MODES:
        raise ValueError(f"mask has mode {mask.mode!r}; expected class indices in a single-channel image (L or P)")
    if mask.size != image_size:
        raise ValueError(f"image is {image_size[0]}x{image_size[1]} but its mask is {mask.size[0]}x{mask.size[1]}")


def mask_array(mask: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` uint8 class indices of a mask checked by :func:`check_mask`."""
    check_mask(mask, image_size)
    return np.array(mask)


def scaled_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """``(width, height)`` with the long side set to ``long_side``, aspect kept, short side rounded half up."""
    if height > width:
        return int(width * long_side / height + 0.5), long_side
    return long_side, int(height * long_side / width + 0.5)


def random_scale(image: Image.Image, mask: Image.Image, base_size: int) -> tuple[Image.Image, Image.Image]:
    """Resize so the long side is a random integer in ``[int(0.5 * base), int(2.0 * base)]`` (bilinear image,
    nearest mask)."""
    width, height = scaled_size(*image.size, _randint(int(base_size * 0.5), int(base_size * 2.0)))
    return F.resize(image, [height, width], v2.InterpolationMode.BILINEAR), F.resize(
        mask, [height, width], v2.InterpolationMode.NEAREST
    )


def pad_and_crop(image: Image.Image, mask: Image.Image, crop_size: int) -> tuple[Image.Image, Image.Image]:
    """Pad right / bottom up to ``crop_size`` (image 0, mask ignore), then take a uniformly placed square."""
    padding = [0, 0, max(crop_size - image.width, 0), max(crop_size - image.height, 0)]
    image, mask = F.pad(image, padding, fill=0), F.pad(mask, padding, fill=IGNORE_INDEX)
    left, top = _randint(0, image.width - crop_size), _randint(0, image.height - crop_size)
    return F.crop(image, top, left, crop_size, crop_size), F.crop(mask, top, left, crop_size, crop_size)


def random_hflip(image, mask):
    """Flip image and mask (PIL images or ``[..., H, W]`` tensors) together with probability 0.5."""
    if torch.rand(()) < 0.5:
        return F.horizontal_flip(image), F.horizontal_flip(mask)
    return image, mask


def random_blur(image: Image.Image, p: float = 0.5) -> Image.Image:
    """With probability ``p``, PIL's Gaussian blur with radius (= sigma) uniform in [0.1, 2.0]; PIL's, not
    ``v2.GaussianBlur``, because the reference blurs with PIL, whose kernel is not truncated to a fixed size."""
    if torch.rand(()) < p:
        return image.filter(ImageFilter.GaussianBlur(radius=_uniform(0.1, 2.0)))
    return image


def cutout(
    image: torch.Tensor,
    mask: torch.Tensor,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``p``, fill a random box of ``image`` with random values and ignore it in ``mask``.

    Box: area ``U(area) * H * W``, aspect ``r ~ U(ratio)``, width ``int(sqrt(area / r))``, height
    ``int(sqrt(area * r))``, top-left corner uniform; everything is redrawn until the box fits.
    ``v2.RandomErasing`` draws ratios log-uniformly, gives up after 10 tries, fills with normal noise and
    leaves masks alone, hence this function.

    Args:
        image: ``[3, H, W]`` uint8, changed in place.
        mask: ``[..., H, W]`` class indices, changed in place.

    Returns:
        ``(image, mask)``.
    """
    if torch.rand(()) >= p:
        return image, mask
    height, width = image.shape[-2:]
    while True:
        box_area = _uniform(*area) * height * width
        box_ratio = _uniform(*ratio)
        box_width, box_height = int(math.sqrt(box_area / box_ratio)), int(math.sqrt(box_area * box_ratio))
        left, top = _randint(0, width - 1), _randint(0, height - 1)
        if left + box_width <= width and top + box_height <= height:
            break
    image[:, top : top + box_height, left : left + box_width] = torch.randint(
        0, 256, (image.shape[0], box_height, box_width), dtype=image.dtype
    )
    mask[..., top : top + box_height, left : left + box_width] = IGNORE_INDEX
    return image, mask


class TrainTransform:
    """Training augmentation: random scale, pad + crop, flip; with ``strong`` also colour jitter, grayscale,
    blur and cutout (pseudo-labeled images only).

    ``(PIL image, PIL mask) -> (pixels [3, crop, crop] uint8, labels [crop, crop] uint8)``, 255 = ignore;
    :func:`~stpp_hf.data.normalization.normalize_batch` makes model inputs of a batch of them. The subclass
    :class:`~stpp_hf.data.fast_transforms.FastTrainTransform` overrides ``color_jitter``, :meth:`scale_and_crop`
    and :meth:`to_tensors`.
    """

    color_jitter = v2.ColorJitter

    def __init__(self, base_size: int, crop_size: int, strong: bool = False):
        if base_size < 2 or crop_size < 1:
            raise ValueError(f"base_size must be >= 2 and crop_size >= 1, got {base_size} and {crop_size}")
        self.base_size, self.crop_size, self.strong = base_size, crop_size, strong
        jitter = self.color_jitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
        self.color = v2.Compose([v2.RandomApply([jitter], p=0.8), v2.RandomGrayscale(p=0.2)])

    def scale_and_crop(self, image: Image.Image, mask: Image.Image):
        """``(image, mask)`` scaled and cropped to ``crop_size`` squares (docs/method.md §3, steps 1-2)."""
        image, mask = random_scale(image, mask, self.base_size)
        return pad_and_crop(image, mask, self.crop_size)

    def to_tensors(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixels [3, H, W] uint8, labels [H, W] uint8)`` of the augmented image and mask."""
        return F.pil_to_tensor(image), F.pil_to_tensor(mask)[0]

    def __call__(self, image: Image.Image, mask: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            raise ValueError("a training sample needs a mask (true or pseudo label)")
        image = rgb_image(image)
        check_mask(mask, image.size)
        image, mask = random_hflip(*self.scale_and_crop(image, mask))
        if self.strong:
            image = random_blur(self.color(image))
        pixels, labels = self.to_tensors(image, mask)
        return cutout(pixels, labels) if self.strong else (pixels, labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_size={self.base_size}, crop_size={self.crop_size}, strong={self.strong})"


class EvalTransform:
    """Full image, no resize: ``(PIL image, PIL mask | None) -> (pixel_values [3, H, W] float32
    ImageNet-normalised, labels [H, W] int64 | None)``."""

    def __call__(self, image: Image.Image, mask: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = rgb_image(image)
        labels = None if mask is None else torch.from_numpy(mask_array(mask, image.size)).long()
        return normalize(image), labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
