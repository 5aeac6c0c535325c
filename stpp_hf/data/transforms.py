"""The method's joint image/mask augmentations (docs/method.md §3 and §7) on ``torchvision.transforms.v2``.

``TrainTransform(base_size, crop_size, strong=False)`` maps ``(PIL image, PIL mask)`` to
``(pixels [3, crop, crop] uint8, labels [crop, crop] uint8)``: training items cross the DataLoader's
worker hand-off at a quarter (pixels) and an eighth (labels) of the float32 / int64 size, and the
trainer turns each batch into model inputs on its device with :func:`normalize_batch` (float32
ImageNet-normalised pixels) and ``labels.long()``, as timm's PrefetchLoader does.
``EvalTransform()`` maps ``(PIL image, PIL mask | None)`` to ``(pixel_values [3, H, W] float32
ImageNet-normalised, labels [H, W] int64 | None)`` directly. Images of any mode become 8-bit RGB first
(:func:`~stpp_hf.data.images.rgb_image`: 16-bit and float images stretched per image). Masks are
``[H, W]`` uint8 numpy arrays until the end and only ever indexed (nearest-neighbour source pixels,
padding, flips), so class indices are never interpolated; the image stays a PIL image until the colour
steps are done, as in the reference.

Randomness comes only from torch's global CPU generator (v2 transforms draw from it too). In training,
:class:`~stpp_hf.training.sampling.SeededItems` seeds it for each item from the epoch's seed and the
item's index, so an item's augmentations do not depend on the DataLoader worker or process that makes it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .images import rgb_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
MASK_MODES = ("L", "P")

# (x / 255 - mean) / std as one multiply and one subtract per element, constants folded in float64
_PIXEL_SCALE = torch.tensor([1 / (255 * std) for std in IMAGENET_STD]).view(3, 1, 1)
_PIXEL_SHIFT = torch.tensor([mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """An integer drawn uniformly from ``[low, high]`` (both ends included)."""
    return int(torch.randint(low, high + 1, ()).item())


def mask_array(mask: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` uint8 class indices of a single-channel mask the size of its image."""
    if mask.mode not in MASK_MODES:
        raise ValueError(f"mask has mode {mask.mode!r}; expected class indices in a single-channel image (L or P)")
    if mask.size != image_size:
        raise ValueError(f"image is {image_size[0]}x{image_size[1]} but its mask is {mask.size[0]}x{mask.size[1]}")
    return np.array(mask)


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


def planar_pixels(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` contiguous uint8 tensor of an RGB PIL image, equal to ``F.pil_to_tensor(image)``.

    PIL splits the bands in C, so the pixels are planar in one pass; ``pil_to_tensor`` returns a
    strided view of the interleaved pixels, which collating then has to transpose (about twice the
    CPU time in all).
    """
    pixels = np.empty((3, image.height, image.width), dtype=np.uint8)
    for channel, band in enumerate(image.split()):
        pixels[channel] = np.asarray(band)
    return torch.from_numpy(pixels)


def normalize(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` float32 ImageNet-normalised tensor of an RGB PIL image or ``[3, H, W]`` uint8 tensor.

    Equal to ``(x / 255 - mean) / std`` up to float32 rounding (a few 1e-7).
    """
    return _normalized(F.pil_to_tensor(image) if isinstance(image, Image.Image) else image)


def normalize_batch(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 batch (on any device) -> ``[B, 3, H, W]`` float32 ImageNet-normalised
    batch on the same device: the model input made of a batch of :class:`TrainTransform` items.

    The same operations as :func:`normalize`, so on CPU each image equals its per-sample
    normalisation bit for bit.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected a [B, 3, H, W] uint8 batch, got {tuple(pixels.shape)} {pixels.dtype}")
    return _normalized(pixels)


def scaled_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """``(width, height)`` with the long side set to ``long_side``, aspect kept, short side rounded half up."""
    if height > width:
        return int(width * long_side / height + 0.5), long_side
    return long_side, int(height * long_side / width + 0.5)


def _nearest_sources(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel of a nearest resize ``in_size -> out_size``, bit-exact with
    PIL's NEAREST, which steps the sampling position by accumulated additions (hence the cumsum)."""
    step = in_size / out_size
    positions = np.cumsum(np.concatenate([[step * 0.5], np.full(out_size - 1, step)]))
    return np.minimum(positions.astype(np.int64), in_size - 1)


def random_scale_and_crop(
    image: Image.Image, mask: np.ndarray, base_size: int, crop_size: int
) -> tuple[Image.Image, np.ndarray]:
    """Steps 1-2 of docs/method.md §3 in one pass: resize so the long side is a random integer in
    ``[int(0.5*base), int(2.0*base)]`` (bilinear image, nearest mask), pad right/bottom up to
    ``crop_size`` (image 0, mask 255), and take a uniformly placed ``crop_size`` square.

    Only the window that survives the crop is resampled: PIL's ``resize(box=...)`` evaluates the same
    bilinear filter at the same source positions as resizing the whole image and cropping afterwards,
    and the mask takes the same source pixels as PIL's NEAREST. The mask equals the unfused reference
    exactly, the image up to the 8-bit rounding of PIL's intermediate pass (0 or 1 grey level; 2 on
    about 1e-5 of the pixels of a noise image),
    and an upscaled image costs a crop instead of a full ``2 * base`` resize. ``v2.Resize`` has no
    source box, hence PIL here. ``mask`` is ``[H, W]`` uint8; the result is ``[crop, crop]``.
    """
    width, height = image.size
    new_width, new_height = scaled_size(width, height, _randint(int(base_size * 0.5), int(base_size * 2.0)))
    left = _randint(0, max(new_width, crop_size) - crop_size)
    top = _randint(0, max(new_height, crop_size) - crop_size)
    # the part of the crop window that lies inside the resized image (the rest is padding)
    window_width, window_height = min(left + crop_size, new_width) - left, min(top + crop_size, new_height) - top
    # multiply before dividing: a window spanning the whole resized side maps exactly onto the source
    box = (
        left * width / new_width,
        top * height / new_height,
        (left + window_width) * width / new_width,
        (top + window_height) * height / new_height,
    )
    image = image.resize((window_width, window_height), Image.BILINEAR, box=box)
    rows = _nearest_sources(height, new_height)[top : top + window_height]
    columns = _nearest_sources(width, new_width)[left : left + window_width]
    window = mask.take(rows, axis=0).take(columns, axis=1)  # two takes: cheaper than one 2-D gather
    if window_width == window_height == crop_size:
        return image, window
    image = F.pad(image, [0, 0, crop_size - window_width, crop_size - window_height], fill=0)
    mask = np.full((crop_size, crop_size), IGNORE_INDEX, dtype=np.uint8)
    mask[:window_height, :window_width] = window
    return image, mask


def random_hflip(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """Flip image and mask (``[H, W]``) together with probability 0.5."""
    if torch.rand(()) < 0.5:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask[:, ::-1]
    return image, mask


def random_blur(image: Image.Image, p: float = 0.5) -> Image.Image:
    """PIL Gaussian blur with radius (= sigma) uniform in [0.1, 2.0], with probability ``p``.

    PIL's filter rather than ``v2.GaussianBlur``: the reference blurs with PIL, whose kernel is not
    truncated to a fixed size.
    """
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
    """With probability ``p``, fill a random box of ``image`` (``[3, H, W]`` uint8) with random values
    and set it to 255 in ``mask`` (``[..., H, W]``), in place.

    Box: area ``U(area) * H * W``, aspect ``r ~ U(ratio)``, width ``int(sqrt(area / r))``, height
    ``int(sqrt(area * r))``, top-left corner uniform; everything is redrawn until the box fits
    (docs/method.md §3). ``v2.RandomErasing`` draws ratios log-uniformly, gives up after 10 tries, fills with
    normal noise and leaves masks alone, hence this function.
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


def _pack_rgb(pixels: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 -> ``[...]`` uint32 colour codes ``c0 << 16 | c1 << 8 | c2``."""
    return (pixels[..., 0].astype(np.uint32) << 16) | (pixels[..., 1].astype(np.uint32) << 8) | pixels[..., 2]


@functools.cache
def _hue_tables() -> tuple[np.ndarray, np.ndarray]:
    """PIL's own RGB -> HSV and HSV -> RGB conversions of all 2^24 colours, 64 MB each.

    ``to_hsv[rgb code]`` is the HSV code; ``to_rgb[hsv code]`` holds the RGB bytes (plus one pad byte)
    of an HSV code. Built once per process (1.5 to 3.5 s measured); DataLoader workers forked later share them.
    """
    codes = np.arange(1 << 24, dtype=np.uint32)
    grid = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    to_hsv = _pack_rgb(np.asarray(Image.fromarray(grid, "RGB").convert("HSV"))).ravel()
    to_rgb = np.zeros((1 << 24, 4), dtype=np.uint8)
    to_rgb[:, :3] = np.asarray(Image.fromarray(grid, "HSV").convert("RGB")).reshape(-1, 3)
    return to_hsv, to_rgb.view(np.uint32).ravel()


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """``torchvision.transforms.v2.functional.adjust_hue`` for an RGB PIL image, byte for byte, in about half
    the time: the HSV round trip is two look-ups in :func:`_hue_tables` instead of two per-pixel PIL
    conversions. The hue shift is torchvision's: ``hue_factor * 255`` truncated, added modulo 256."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5]")
    if image.mode != "RGB":
        raise ValueError(f"adjust_hue takes an RGB image, got mode {image.mode!r}")
    to_hsv, to_rgb = _hue_tables()
    shift = np.uint32(np.int32(hue_factor * 255).astype(np.uint8)) << 16
    hsv = to_hsv[_pack_rgb(np.asarray(image))]
    rgbx = to_rgb[(hsv + shift) & 0xFFFFFF]  # the mask drops the carry out of the hue byte
    return Image.frombytes("RGB", image.size, rgbx.tobytes(), "raw", "RGBX")


class ColorJitter(v2.ColorJitter):
    """``v2.ColorJitter`` with the same parameters, random draws and output bytes, whose hue step on RGB
    PIL images is :func:`adjust_hue` (the slowest of the four steps in PIL, about 4 ms on a 321-px crop)."""

    def transform(self, inpt, params: dict):
        if not (isinstance(inpt, Image.Image) and inpt.mode == "RGB"):
            return super().transform(inpt, params)
        steps = (
            (F.adjust_brightness, "brightness_factor"),
            (F.adjust_contrast, "contrast_factor"),
            (F.adjust_saturation, "saturation_factor"),
            (adjust_hue, "hue_factor"),
        )
        for index in params["fn_idx"].tolist():
            function, factor = steps[index]
            if params[factor] is not None:
                inpt = function(inpt, params[factor])
        return inpt


class TrainTransform:
    """Training augmentation: random scale, pad + crop (fused), flip; with ``strong`` also colour jitter,
    grayscale, blur and cutout (pseudo-labeled images only).

    ``(PIL image, PIL mask) -> (pixels [3, crop, crop] uint8, labels [crop, crop] uint8)``, 255 = ignore;
    :func:`normalize_batch` makes model inputs of a batch of them.
    """

    def __init__(self, base_size: int, crop_size: int, strong: bool = False):
        if base_size < 2 or crop_size < 1:
            raise ValueError(f"base_size must be >= 2 and crop_size >= 1, got {base_size} and {crop_size}")
        self.base_size, self.crop_size, self.strong = base_size, crop_size, strong
        self.color = v2.Compose([v2.RandomApply([ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8), v2.RandomGrayscale(p=0.2)])
        if strong:
            _hue_tables()  # now, so DataLoader workers forked from this process share them

    def __call__(self, image: Image.Image, mask: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            raise ValueError("a training sample needs a mask (true or pseudo label)")
        image = rgb_image(image)
        image, mask = random_scale_and_crop(image, mask_array(mask, image.size), self.base_size, self.crop_size)
        image, mask = random_hflip(image, mask)
        labels = torch.from_numpy(np.ascontiguousarray(mask))
        if not self.strong:
            return planar_pixels(image), labels
        image = random_blur(self.color(image))
        return cutout(planar_pixels(image), labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_size={self.base_size}, crop_size={self.crop_size}, strong={self.strong})"


class EvalTransform:
    """Full image, no resize: ``(PIL image, PIL mask | None) -> (pixel_values [3, H, W], labels [H, W] | None)``."""

    def __call__(self, image: Image.Image, mask: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = rgb_image(image)
        labels = None if mask is None else torch.from_numpy(mask_array(mask, image.size)).long()
        return normalize(image), labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
