"""Faster equivalents of steps of :class:`~stpp_hf.data.transforms.TrainTransform`, fenced here so the method
reads plainly there. :class:`FastTrainTransform` is what training runs; each piece draws the same random numbers
in the same order as the plain step it replaces and gives the same bytes, except the fused scale + crop, whose
image may differ from the plain one by the 8-bit rounding of PIL's intermediate pass (tests/test_transforms.py
checks every piece against the plain code; benchmarks/bench_loader.py times the data path).

* :func:`random_scale_and_crop`: resizes only the part of the image that survives the crop.
* :func:`adjust_hue` / :class:`ColorJitter`: the hue step as two look-ups in tables of PIL's own HSV conversions.
* :func:`planar_pixels`: a contiguous ``[3, H, W]`` tensor in one pass, which collates without a transpose.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..models.deeplab.label_presets import IGNORE_INDEX
from .transforms import TrainTransform, _randint, scaled_size


def planar_pixels(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` contiguous uint8 tensor of an RGB PIL image, equal to ``F.pil_to_tensor(image)``.

    PIL splits the bands in C, so the pixels are planar in one pass; ``pil_to_tensor`` returns a strided view
    of the interleaved pixels, which collating then has to transpose.
    """
    pixels = np.empty((3, image.height, image.width), dtype=np.uint8)
    for channel, band in enumerate(image.split()):
        pixels[channel] = np.asarray(band)
    return torch.from_numpy(pixels)


def _nearest_sources(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel of a nearest resize ``in_size -> out_size``, bit-exact with
    PIL's NEAREST, which steps the sampling position by accumulated additions (hence the cumsum)."""
    step = in_size / out_size
    positions = np.cumsum(np.concatenate([[step * 0.5], np.full(out_size - 1, step)]))
    return np.minimum(positions.astype(np.int64), in_size - 1)


def random_scale_and_crop(
    image: Image.Image, mask: np.ndarray, base_size: int, crop_size: int
) -> tuple[Image.Image, np.ndarray]:
    """:func:`~stpp_hf.data.transforms.random_scale` then :func:`~stpp_hf.data.transforms.pad_and_crop` in
    one pass, with the same draws.

    Only the window that survives the crop is resampled: PIL's ``resize(box=...)`` evaluates the same bilinear
    filter at the same source positions as resizing the whole image and cropping afterwards, and the mask takes
    the same source pixels as PIL's NEAREST. The mask equals the plain steps' exactly, the image up to the 8-bit
    rounding of PIL's intermediate pass (0 or 1 grey level; 2 on about 1e-5 of the pixels of a noise image), and
    an upscaled image costs a crop instead of a full ``2 * base`` resize. ``v2.Resize`` has no source box, hence
    PIL here.

    Args:
        image: RGB PIL image of size ``(W, H)``.
        mask: ``[H, W]`` uint8 class indices.
        base_size: the long side is drawn from ``[int(0.5 * base_size), int(2.0 * base_size)]``.
        crop_size: side of the square crop.

    Returns:
        ``(image, mask)``: a ``crop_size`` square PIL image and ``[crop_size, crop_size]`` uint8.
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


def _pack_rgb(pixels: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 -> ``[...]`` uint32 colour codes ``c0 << 16 | c1 << 8 | c2``."""
    return (pixels[..., 0].astype(np.uint32) << 16) | (pixels[..., 1].astype(np.uint32) << 8) | pixels[..., 2]


@functools.cache
def _hue_tables() -> tuple[np.ndarray, np.ndarray]:
    """PIL's own RGB -> HSV and HSV -> RGB conversions of all 2^24 colours, 64 MB each.

    ``to_hsv[rgb code]`` is the HSV code; ``to_rgb[hsv code]`` holds the RGB bytes (plus one pad byte) of an
    HSV code. Built once per process; DataLoader workers forked later share them.
    """
    codes = np.arange(1 << 24, dtype=np.uint32)
    grid = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    to_hsv = _pack_rgb(np.asarray(Image.fromarray(grid, "RGB").convert("HSV"))).ravel()
    to_rgb = np.zeros((1 << 24, 4), dtype=np.uint8)
    to_rgb[:, :3] = np.asarray(Image.fromarray(grid, "HSV").convert("RGB")).reshape(-1, 3)
    return to_hsv, to_rgb.view(np.uint32).ravel()


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """``torchvision.transforms.v2.functional.adjust_hue`` for an RGB PIL image, byte for byte: the HSV round
    trip is two look-ups in :func:`_hue_tables` instead of two per-pixel PIL conversions. The hue shift is
    torchvision's: ``hue_factor * 255`` truncated, added modulo 256."""
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
    """``v2.ColorJitter`` with the same parameters, random draws and output bytes, whose hue step on RGB PIL
    images (the slowest of the four steps in PIL) is :func:`adjust_hue`."""

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


class FastTrainTransform(TrainTransform):
    """:class:`~stpp_hf.data.transforms.TrainTransform` with the fused scale + crop, the table-driven hue step
    and planar pixels; same arguments, draws and outputs (the image of the fused step up to 8-bit rounding)."""

    color_jitter = ColorJitter

    def __init__(self, base_size: int, crop_size: int, strong: bool = False):
        super().__init__(base_size, crop_size, strong)
        if strong:
            _hue_tables()  # now, so DataLoader workers forked from this process share them

    def scale_and_crop(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        image, labels = random_scale_and_crop(image, np.asarray(mask), self.base_size, self.crop_size)
        return image, torch.from_numpy(labels)

    def to_tensors(self, image: Image.Image, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return planar_pixels(image), labels
