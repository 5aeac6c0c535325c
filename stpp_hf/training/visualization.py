"""PNGs of a run: a grid of val predictions next to the ground truth per training stage, and the picture
of the ST++ selection (reliability histogram with the reliable / unreliable cut, the most and the least
reliable unlabeled images with the teacher's predictions). Drawn with PIL only."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..data.normalization import IMAGENET_MEAN, IMAGENET_STD
from ..file_io import atomic_write_bytes
from ..models.deeplab.label_presets import colorize

_MEAN, _STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _denormalize(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` ImageNet-normalised pixels back to an 8-bit RGB image."""
    pixels = ((image * _STD + _MEAN).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


@torch.no_grad()
def save_prediction_grid(
    model: torch.nn.Module,
    dataset: Sequence,
    path: str | Path,
    palette: list[int] | None,
    num_images: int = 6,
    device: torch.device | str = "cpu",
) -> None:
    """Rows of (image | ground truth | prediction) for the first ``num_images`` of ``dataset``; the predictions
    run on ``device`` (the run's accelerator: the other processes wait while the main process draws)."""
    model.eval().to(device)
    rows = []
    for index in range(min(num_images, len(dataset))):
        image, mask = dataset[index]
        prediction = _predict(model, image, device)
        tiles = [
            _denormalize(image),
            colorize(mask, palette) if mask is not None else None,
            colorize(prediction, palette),
        ]
        rows.append([tile for tile in tiles if tile is not None])
    if not rows:
        return
    tile_width = max(tile.width for row in rows for tile in row)
    tile_height = max(tile.height for row in rows for tile in row)
    grid = Image.new("RGB", (tile_width * max(len(row) for row in rows), tile_height * len(rows)), "white")
    for row_index, row in enumerate(rows):
        for column, tile in enumerate(row):
            grid.paste(tile, (column * tile_width, row_index * tile_height))
    _save_atomically(grid, path)


def _predict(model: torch.nn.Module, image: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The argmax map ``[H, W]`` (on the CPU) of one image ``[3, H, W]``, computed on ``device``."""
    return model(pixel_values=image[None].to(device)).logits.argmax(dim=1)[0].cpu()


def _save_atomically(image: Image.Image, path: str | Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _histogram(scores: Sequence[float], cut: float, width: int, height: int = 150, bins: int = 20) -> Image.Image:
    """Bars of the reliability scores in ``[0, 1]`` (reliable ones green, the rest red) and the cut as a line."""
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left, right, top, bottom = 30, width - 10, 20, height - 20
    counts = [0] * bins
    for score in scores:
        counts[min(int(score * bins), bins - 1)] += 1
    tallest = max(counts) or 1
    bar = (right - left) / bins
    for index, count in enumerate(counts):
        x0 = left + index * bar
        color = (60, 160, 60) if (index + 0.5) / bins >= cut else (200, 70, 60)
        draw.rectangle([x0 + 1, bottom - (bottom - top) * count / tallest, x0 + bar - 1, bottom], fill=color)
    cut_x = left + cut * (right - left)
    draw.line([cut_x, top - 5, cut_x, bottom], fill="black", width=2)
    draw.line([left, bottom, right, bottom], fill="black")
    draw.text((left, bottom + 4), "0", fill="black", font=font)
    draw.text((right - 6, bottom + 4), "1", fill="black", font=font)
    draw.text(
        (left, 4),
        f"reliability of {len(scores)} unlabeled images; cut {cut:.3f} (reliable: right, green)",
        fill="black",
        font=font,
    )
    draw.text((2, top), str(tallest), fill="black", font=font)
    return canvas


@torch.no_grad()
def selection_figure_rows(ids: Sequence[str], scores: dict[str, float], num_images: int = 4) -> list[tuple[str, list]]:
    """The image rows of the selection picture: ``[("most reliable", ids), ("least reliable", ids)]``."""
    ranked = sorted(ids, key=lambda image_id: scores[image_id], reverse=True)
    return [("most reliable", ranked[:num_images]), ("least reliable", ranked[::-1][:num_images])]


def save_selection_figure(
    model: torch.nn.Module,
    dataset: Sequence,
    ids: Sequence[str],
    scores: dict[str, float],
    reliable: Sequence[str],
    path: str | Path,
    palette: list[int] | None,
    num_images: int = 4,
    tile: int = 96,
    device: torch.device | str = "cpu",
) -> None:
    """The selection picture: histogram of ``scores`` with the reliable / unreliable cut, then a row of the
    ``num_images`` most reliable and a row of the least reliable images (``dataset[i]`` is image ``ids[i]``,
    ``(pixel_values [3, H, W], mask | None)``), each next to ``model``'s prediction (argmax, no TTA, on
    ``device``)."""
    model.eval().to(device)
    ranked = sorted(ids, key=lambda image_id: scores[image_id], reverse=True)
    position = {image_id: index for index, image_id in enumerate(ids)}
    cut = (scores[reliable[-1]] + scores[ranked[len(reliable)]]) / 2 if 0 < len(reliable) < len(ranked) else 0.5
    font = ImageFont.load_default()
    rows = selection_figure_rows(ids, scores, num_images)
    width = max(2 * tile * num_images, 360)
    canvas = Image.new("RGB", (width, 150 + len(rows) * (tile + 14)), "white")
    canvas.paste(_histogram([scores[i] for i in ids], cut, width), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row_index, (title, row_ids) in enumerate(rows):
        y = 150 + row_index * (tile + 14)
        for column, image_id in enumerate(row_ids):
            image, _ = dataset[position[image_id]]
            prediction = _predict(model, image, device)
            x = column * 2 * tile
            canvas.paste(_denormalize(image).resize((tile, tile), Image.BILINEAR), (x, y + 14))
            canvas.paste(colorize(prediction, palette).resize((tile, tile), Image.NEAREST), (x + tile, y + 14))
            draw.text(
                (x + 2, y + 1),
                f"{title}: {scores[image_id]:.3f}" if column == 0 else f"{scores[image_id]:.3f}",
                fill="black",
                font=font,
            )
    _save_atomically(canvas, path)


CONTACT_SHEET_COLUMNS = 4  # (image, prediction) pairs per row


def contact_sheet_size(num_images: int, tile: int = 128) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet of ``num_images`` images (:func:`save_contact_sheet`)."""
    columns = min(num_images, CONTACT_SHEET_COLUMNS)
    rows = -(-num_images // CONTACT_SHEET_COLUMNS)
    return 2 * tile * columns, rows * (tile + 14)


@torch.no_grad()
def save_contact_sheet(
    model: torch.nn.Module,
    items: Sequence,
    captions: Sequence[str],
    path: str | Path,
    palette: list[int] | None,
    tile: int = 128,
) -> None:
    """Each item (``(pixel_values [3, H, W], mask | None)``) next to ``model``'s prediction (argmax, no TTA), under
    its caption; :data:`CONTACT_SHEET_COLUMNS` pairs a row (size: :func:`contact_sheet_size`)."""
    model.eval()
    font = ImageFont.load_default()
    canvas = Image.new("RGB", contact_sheet_size(len(items), tile), "white")
    draw = ImageDraw.Draw(canvas)
    for position, ((image, _), caption) in enumerate(zip(items, captions)):
        row, column = divmod(position, CONTACT_SHEET_COLUMNS)
        x, y = column * 2 * tile, row * (tile + 14)
        prediction = model(pixel_values=image[None]).logits.argmax(dim=1)[0]
        canvas.paste(_denormalize(image).resize((tile, tile), Image.BILINEAR), (x, y + 14))
        canvas.paste(colorize(prediction, palette).resize((tile, tile), Image.NEAREST), (x + tile, y + 14))
        draw.text((x + 2, y + 1), caption, fill="black", font=font)
    _save_atomically(canvas, path)
