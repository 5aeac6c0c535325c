"""A PNG grid of val predictions next to the ground truth, one per training stage."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _palette_image(label_map: torch.Tensor, palette: list[int] | None) -> Image.Image:
    """``[H, W]`` class indices (255 = ignore) as a palette image, rendered to RGB."""
    image = Image.fromarray(label_map.to(torch.uint8).numpy(), mode="P")
    if palette is not None:
        image.putpalette(palette)
    return image.convert("RGB")


def _denormalize(image: torch.Tensor) -> Image.Image:
    pixels = ((image * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


@torch.no_grad()
def save_prediction_grid(
    model: torch.nn.Module, dataset: Sequence, path: str | Path, palette: list[int] | None, num_images: int = 6
) -> None:
    """Rows of (image | ground truth | prediction) for the first ``num_images`` of ``dataset``."""
    model.eval()
    rows = []
    for index in range(min(num_images, len(dataset))):
        image, mask = dataset[index]
        prediction = model(pixel_values=image[None]).logits.argmax(dim=1)[0]
        tiles = [_denormalize(image), _palette_image(mask, palette) if mask is not None else None, _palette_image(prediction, palette)]
        rows.append([tile for tile in tiles if tile is not None])
    if not rows:
        return
    tile_width = max(tile.width for row in rows for tile in row)
    tile_height = max(tile.height for row in rows for tile in row)
    grid = Image.new("RGB", (tile_width * max(len(row) for row in rows), tile_height * len(rows)), "white")
    for row_index, row in enumerate(rows):
        for column, tile in enumerate(row):
            grid.paste(tile, (column * tile_width, row_index * tile_height))
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp.png")
    grid.save(temporary)
    temporary.replace(path)
