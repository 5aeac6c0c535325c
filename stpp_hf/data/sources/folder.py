"""A custom folder: ``images/`` (any PIL-readable files, nested folders allowed), ``masks/`` with a
class-index mask of the same relative path and stem for each labeled image, and ``id2label.json``
(``{"0": "background", "1": "cat", ...}``) giving the classes::

    my_data/images/a/001.jpg   my_data/masks/a/001.png   my_data/id2label.json

Without a split file every image is listed, with its mask when one exists (images without a mask are
unlabeled). A mask may have any image extension in any case (``.png``, ``.PNG``, ``.bmp``, ``.tif``); a
lossy one (JPEG, lossy WebP) is an error, since lossy coding changes class ids at region edges. Files in
``masks/`` that belong to no image are reported (a warning). A split file lists paths relative to the root
as usual. The id is the image's path under ``images/`` without extension (``a/001``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ...log import get_logger
from ...models.deeplab.label_presets import flat_palette
from ..images import IMAGE_EXTENSIONS, check_lossless_mask
from ..splits import SplitEntry
from .base import DatasetSource, Record, check_unique_ids, read_id2label_file

IMAGES_DIR, MASKS_DIR, ID2LABEL_FILE = "images", "masks", "id2label.json"
UNMATCHED_LISTED = 5

logger = get_logger(__name__)


def read_id2label(root: str | os.PathLike) -> dict[int, str]:
    """The classes of a folder dataset from ``root/id2label.json`` (keys ``0..N-1``)."""
    return read_id2label_file(Path(root) / ID2LABEL_FILE)


class FolderSource(DatasetSource):
    name = "folder"

    def record_for(self, root: Path, entry: SplitEntry) -> Record:
        image = Path(entry.image)
        relative = image.relative_to(IMAGES_DIR) if image.parts[0] == IMAGES_DIR else image
        mask = None if entry.mask is None else root / entry.mask
        return Record(relative.with_suffix("").as_posix(), root / entry.image, mask)

    def classes(self, root: str | os.PathLike) -> tuple[dict[int, str], list[int]]:
        """Names from ``root/id2label.json``, colours of the VOC colour map (it has 256)."""
        return read_id2label(root), flat_palette(self.colors)

    def records(self, root: Path, split_file) -> list[Record]:
        if self.num_labels is None:
            self.num_labels = len(read_id2label(root))
        if split_file is not None:
            return super().records(root, split_file)
        images_dir = root / IMAGES_DIR
        if not images_dir.is_dir():
            raise FileNotFoundError(f"{images_dir} does not exist (a folder dataset keeps its images there)")
        masks = masks_by_id(root / MASKS_DIR)
        records, unmatched = [], []
        for image in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            sample_id = image.relative_to(images_dir).with_suffix("").as_posix()
            candidates = masks.pop(sample_id, [])
            records.append(Record(sample_id, image, matched_mask(sample_id, candidates)))
            unmatched += [path for path in candidates if path != records[-1].mask]
        if not records:
            raise ValueError(f"{images_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        check_unique_ids(records, str(images_dir))
        unmatched = sorted(map(str, unmatched + [path for paths in masks.values() for path in paths]))
        if unmatched:
            logger.warning(
                "%d files in %s match no image in %s and are not used (first: %s)",
                len(unmatched),
                root / MASKS_DIR,
                images_dir,
                ", ".join(unmatched[:UNMATCHED_LISTED]),
            )
        return records


def masks_by_id(masks_dir: Path) -> dict[str, list[Path]]:
    """Every file under ``masks_dir`` by the id it would label (path without extension), in name order."""
    masks: dict[str, list[Path]] = {}
    if masks_dir.is_dir():
        for path in sorted(p for p in masks_dir.rglob("*") if p.is_file()):
            masks.setdefault(path.relative_to(masks_dir).with_suffix("").as_posix(), []).append(path)
    return masks


def matched_mask(sample_id: str, candidates: list[Path]) -> Path | None:
    """The one lossless image file among ``candidates`` (the files of ``masks/`` with the image's stem)."""
    masks = [path for path in candidates if path.suffix.lower() in IMAGE_EXTENSIONS]
    if len(masks) > 1:
        raise ValueError(f"image {sample_id!r} has {len(masks)} masks: {', '.join(map(str, masks))}; keep one")
    if not masks:
        return None
    check_lossless_mask(masks[0])
    return masks[0]
