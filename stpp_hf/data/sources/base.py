"""What every dataset source shares: records, validation, rows for ``datasets`` and fingerprints.

A source turns ``(root, split file)`` into :class:`Record`\\ s (id, image path, mask path or ``None``);
:func:`iter_rows` validates them while producing the ``{"id", "image", "label"}`` rows that
``datasets`` stores. Images and masks are referenced by path (no copy in the Arrow cache) except
masks a source has to convert (Cityscapes ``labelIds``), which are stored as encoded PNG bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from datasets import Features, Image as ImageFeature, Value
from PIL import Image, UnidentifiedImageError

from ...models.deeplab.label_presets import PASCAL_VOC_PALETTE, flat_palette
from ..splits import SplitEntry, read_split

IGNORE_INDEX = 255
FEATURES = Features({"id": Value("string"), "image": ImageFeature(), "label": ImageFeature()})
MASK_MODES = ("L", "P")
# bump when rows change meaning for the same files, so old caches are not reused
ROW_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Record:
    """One sample: a unique ``id`` (may contain ``/``), absolute image path, mask path or ``None``."""

    id: str
    image: Path
    mask: Path | None


class DatasetSource:
    """A dataset layout. Subclasses set ``name`` and ``num_labels`` and implement :meth:`record_for`;
    a dataset with fixed classes also sets ``class_names`` and ``colors`` (one RGB triplet per class)."""

    name: str = ""
    num_labels: int | None = None
    class_names: tuple[str, ...] | None = None
    colors: tuple[tuple[int, int, int], ...] = PASCAL_VOC_PALETTE

    def classes(self, root: str | os.PathLike) -> tuple[dict[int, str], list[int]]:
        """``(id2label, palette)`` of the dataset under ``root``; the palette is PIL's flat 768-value list
        (the data owns its class names and colours: pseudo-label PNGs and prediction grids use them)."""
        if self.class_names is None:
            raise ValueError(f"the {self.name!r} source has no fixed classes")
        return dict(enumerate(self.class_names)), flat_palette(self.colors)

    def __init__(self, num_labels: int | None = None):
        if num_labels is not None:
            self.num_labels = num_labels

    def record_for(self, root: Path, entry: SplitEntry) -> Record:
        """The record of split line ``entry`` under ``root``."""
        raise NotImplementedError

    def records(self, root: Path, split_file: str | os.PathLike | None) -> list[Record]:
        """Records of every line of ``split_file`` (a path or a shipped split name)."""
        if split_file is None:
            raise ValueError(f"the {self.name!r} source needs a split file")
        records = [self.record_for(root, entry) for entry in read_split(split_file)]
        check_unique_ids(records, str(split_file))
        return records

    def needs_conversion(self, mask_path: Path) -> bool:
        """Whether the mask file must be converted (then the converted PNG is stored, not the path)."""
        return False

    def read_mask(self, mask_path: Path) -> Image.Image:
        """The mask as a single-channel image of class indices (255 = ignore)."""
        return open_image_checked(mask_path, "mask")


def read_id2label_file(path: str | os.PathLike) -> dict[int, str]:
    """Class names from a JSON file ``{"0": "background", "1": "cat", ...}`` (keys ``0..N-1``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; it maps class indices to names, e.g. {{\"0\": \"background\"}}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        id2label = {int(key): str(value) for key, value in raw.items()}
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path}: expected a JSON object {{\"0\": \"name\", ...}}: {error}") from error
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise ValueError(f"{path}: keys must be 0..N-1, got {sorted(id2label)}")
    return id2label


def check_unique_ids(records: Sequence[Record], source: str) -> None:
    seen: dict[str, Record] = {}
    for record in records:
        if record.id in seen:
            raise ValueError(f"{source}: images {seen[record.id].image} and {record.image} map to the same id {record.id!r}")
        seen[record.id] = record


def open_image_checked(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; any failure is an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode {what} {path}: {error}") from error
    return image


def check_mask_values(mask: np.ndarray, num_labels: int | None, where: str) -> None:
    """Raise if ``mask`` holds values outside ``[0, num_labels) ∪ {255}``; ``where`` names the file."""
    if num_labels is None:
        return
    bad = (mask >= num_labels) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])[:8].tolist()
        raise ValueError(f"{where}: mask values {values} are outside [0, {num_labels}) and {IGNORE_INDEX} (ignore)")


def validated_mask(source: DatasetSource, record: Record, image_size: tuple[int, int] | None) -> Image.Image:
    """Read ``record``'s mask through ``source`` and check its mode, size (if given) and values."""
    mask = source.read_mask(record.mask)
    if mask.mode not in MASK_MODES:
        raise ValueError(
            f"mask {record.mask} has mode {mask.mode!r}; expected a single-channel class-index PNG "
            f"(mode {' or '.join(MASK_MODES)}), not a colour rendering"
        )
    if image_size is not None and mask.size != image_size:
        raise ValueError(f"image {record.image} is {image_size[0]}x{image_size[1]} but its mask {record.mask} is {mask.size[0]}x{mask.size[1]}")
    check_mask_values(np.asarray(mask), source.num_labels, str(record.mask))
    return mask


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def iter_rows(source: DatasetSource, records: Sequence[Record], validate: bool = True) -> Iterator[dict]:
    """``{"id", "image", "label"}`` rows; with ``validate`` each image and mask is decoded exactly once
    here and checked (readable, same size, mask mode and values)."""
    for record in records:
        if validate:
            image_size = open_image_checked(record.image, "image").size
        elif not record.image.is_file():
            raise FileNotFoundError(f"image {record.image} does not exist")
        label = None
        if record.mask is not None:
            convert = source.needs_conversion(record.mask)
            mask = validated_mask(source, record, image_size) if validate else None
            if convert:
                label = {"path": None, "bytes": png_bytes(mask if mask is not None else source.read_mask(record.mask))}
            else:
                if not validate and not record.mask.is_file():
                    raise FileNotFoundError(f"mask {record.mask} does not exist")
                label = {"path": str(record.mask), "bytes": None}
        yield {"id": record.id, "image": {"path": str(record.image), "bytes": None}, "label": label}


def fingerprint(source: DatasetSource, root: Path, split_text: str, records: Sequence[Record], validate: bool) -> str:
    """Hash of the source, root, split file contents and every listed file's size and mtime.

    A changed split, an edited or replaced file, or other validation settings give a new fingerprint
    (so ``datasets`` never reuses a stale cache). Missing files are reported here, by name.
    """
    digest = hashlib.sha256()
    header = f"{ROW_FORMAT_VERSION}|{source.name}|{source.num_labels}|{validate}|{root.resolve()}\n{split_text}\n"
    digest.update(header.encode("utf-8"))
    for record in records:
        for what, path in (("image", record.image), ("mask", record.mask)):
            if path is None:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"{what} {path} (id {record.id!r}) does not exist") from None
            digest.update(f"{record.id}|{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()[:32]
