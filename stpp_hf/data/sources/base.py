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
from datasets import Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from ...models.deeplab.label_presets import IGNORE_INDEX, PASCAL_VOC_PALETTE, flat_palette
from ..images import MASK_MODES, check_lossless_mask, exif_orientation, open_image, swaps_sides
from ..splits import SplitEntry, read_split

FEATURES = Features({"id": Value("string"), "image": ImageFeature(), "label": ImageFeature()})
# bump when rows change meaning for the same files or validation tightens, so old caches are not reused
ROW_FORMAT_VERSION = 2


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
        return open_image(mask_path, "mask")


def read_id2label_file(path: str | os.PathLike) -> dict[int, str]:
    """Class names from a JSON file ``{"0": "background", "1": "cat", ...}`` (keys ``0..N-1``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist; it maps class indices to names, e.g. {{"0": "background"}}')
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is fine
        id2label = {int(key): str(value) for key, value in raw.items()}
    except (ValueError, AttributeError) as error:
        raise ValueError(f'{path}: expected a JSON object {{"0": "name", ...}}: {error}') from error
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise ValueError(f"{path}: keys must be 0..N-1, got {sorted(id2label)}")
    return id2label


def check_unique_ids(records: Sequence[Record], source: str) -> None:
    seen: dict[str, Record] = {}
    for record in records:
        if record.id in seen:
            raise ValueError(
                f"{source}: images {seen[record.id].image} and {record.image} map to the same id {record.id!r}"
            )
        seen[record.id] = record


def check_mask_values(mask: np.ndarray, num_labels: int | None, where: str) -> None:
    """Raise if ``mask`` holds values outside ``[0, num_labels) ∪ {255}``; ``where`` names the file."""
    if num_labels is None:
        return
    bad = (mask >= num_labels) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])[:8].tolist()
        raise ValueError(f"{where}: mask values {values} are outside [0, {num_labels}) and {IGNORE_INDEX} (ignore)")


def check_not_binary_export(source: DatasetSource, records: Sequence[Record], where: str) -> None:
    """Refuse a set whose masks hold only 0 and 255 (both present): the usual export of binary annotation
    tools, whose foreground the method would ignore (255 = ignore) everywhere.

    Decided per set, not per file: one mask of background and ignore is legitimate (an image with no object
    but an unsure border), a set without a single pixel of a class other than 0 is not. Stops at the first
    mask with a class in ``1..254``, so an ordinary set costs one or a few mask reads.
    """
    first_ignore, background = None, False
    for record in records:
        if record.mask is None:
            continue
        mask = source.read_mask(record.mask)
        if mask.mode not in MASK_MODES:
            return  # not class indices at all: validation refuses it, naming the file
        counts = np.bincount(np.asarray(mask).ravel(), minlength=256)
        if counts[1:IGNORE_INDEX].any():
            return
        background = background or bool(counts[0])
        if counts[IGNORE_INDEX] and first_ignore is None:
            first_ignore = record.mask
    if first_ignore is not None and background:
        raise ValueError(
            f"{where}: every mask holds only the values 0 and {IGNORE_INDEX} (e.g. {first_ignore}); "
            f"{IGNORE_INDEX} means ignore, so no pixel would be learned as a class other than 0. "
            f"A binary 0/255 export must map its "
            f"foreground to class 1 (mask[mask == 255] = 1) and be saved again as an 8-bit PNG"
        )


def validated_mask(source: DatasetSource, record: Record, image: Image.Image | None) -> Image.Image:
    """Read ``record``'s mask through ``source`` and check its encoding, mode, size (that of ``image``, if
    given, as stored) and values."""
    check_lossless_mask(record.mask)
    mask = source.read_mask(record.mask)
    if mask.mode not in MASK_MODES:
        kind = "a 16-bit or float image" if mask.mode[0] in "IF" else "not a colour rendering"
        raise ValueError(
            f"mask {record.mask} has mode {mask.mode!r}; expected a single-channel 8-bit class-index PNG "
            f"(mode {' or '.join(MASK_MODES)}), {kind}"
        )
    if image is not None and mask.size != image.size:
        message = (
            f"image {record.image} is {image.size[0]}x{image.size[1]} but its mask {record.mask} is "
            f"{mask.size[0]}x{mask.size[1]}"
        )
        orientation = exif_orientation(image)
        if swaps_sides(orientation) and mask.size == image.size[::-1]:
            message += (
                f". The image carries EXIF orientation {orientation} (turned by 90 degrees when viewed) and its mask "
                f"seems drawn on the turned view; images are read as stored (the tag is ignored), so the mask must be "
                f"in the stored orientation: turn the mask back, or save the image upright without the tag"
            )
        raise ValueError(message)
    check_mask_values(np.asarray(mask), source.num_labels, str(record.mask))
    return mask


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def iter_rows(source: DatasetSource, records: Sequence[Record], validate: bool = True) -> Iterator[dict]:
    """``{"id", "image", "label"}`` rows; with ``validate`` each image and mask is decoded exactly once
    here and checked (readable, same stored size, mask encoding, mode and values)."""
    for record in records:
        image = None
        if validate:
            image = open_image(record.image, "image")
        elif not record.image.is_file():
            raise FileNotFoundError(f"image {record.image} does not exist")
        label = None
        if record.mask is not None:
            convert = source.needs_conversion(record.mask)
            mask = validated_mask(source, record, image) if validate else None
            if convert:
                label = {"path": None, "bytes": png_bytes(mask if mask is not None else source.read_mask(record.mask))}
            else:
                if not validate and not record.mask.is_file():
                    raise FileNotFoundError(f"mask {record.mask} does not exist")
                label = {"path": str(record.mask), "bytes": None}
        yield {"id": record.id, "image": {"path": str(record.image), "bytes": None}, "label": label}


def fingerprint(source: DatasetSource, root: Path, split_text: str, records: Sequence[Record], validate: bool) -> str:
    """The ``datasets`` cache key: a hash of the source, root, split file contents and every listed file's size
    and mtime.

    A changed split, an edited or replaced file, another root (the cached rows hold absolute paths) or other
    validation settings give a new key, so ``datasets`` never reuses a stale cache. Missing files are reported
    here, by name. A run identifies its data by content instead (:mod:`.content`).
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
