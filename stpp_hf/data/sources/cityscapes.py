"""Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine/.../*_labelTrainIds.png``
masks (19 classes, 255 ignore).

When a split names a ``*_labelTrainIds.png`` that does not exist but the raw ``*_labelIds.png`` next to
it does, the raw ids are mapped to train ids with the official label table of ``cityscapesscripts``
(``pip install "stpp-hf[cityscapes]"``). Ids keep the split and city (``train/aachen/aachen_000000_000019``)
because frame names repeat across cities' folders.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ...models.deeplab.label_presets import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX
from ..images import MASK_MODES, open_image
from ..splits import SplitEntry
from .base import DatasetSource, Record

TRAIN_IDS_SUFFIX = "_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_labelIds.png"
IMAGE_SUFFIX = "_leftImg8bit"


@lru_cache(maxsize=1)
def label_ids_to_train_ids() -> np.ndarray:
    """A 256-entry lookup table from Cityscapes ``labelId`` to ``trainId`` (ignored ids -> 255)."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as error:
        raise ImportError(
            "mapping Cityscapes labelIds to train ids needs the official label table: "
            'pip install "stpp-hf[cityscapes]" (or cityscapesscripts), or provide *_labelTrainIds.png masks'
        ) from error
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_INDEX:
            table[label.id] = label.trainId
    return table


class CityscapesSource(DatasetSource):
    name = "cityscapes"
    num_labels = 19
    class_names, colors = CITYSCAPES_CLASSES, CITYSCAPES_PALETTE

    def record_for(self, root: Path, entry: SplitEntry) -> Record:
        image = Path(entry.image)
        relative = image.relative_to("leftImg8bit") if image.parts[0] == "leftImg8bit" else image
        sample_id = relative.with_suffix("").as_posix().removesuffix(IMAGE_SUFFIX)
        mask = None
        if entry.mask is not None:
            mask = root / entry.mask
            raw = mask.with_name(mask.name.removesuffix(TRAIN_IDS_SUFFIX) + LABEL_IDS_SUFFIX)
            if mask.name.endswith(TRAIN_IDS_SUFFIX) and not mask.is_file() and raw.is_file():
                mask = raw
        return Record(sample_id, root / entry.image, mask)

    def needs_conversion(self, mask_path: Path) -> bool:
        return mask_path.name.endswith(LABEL_IDS_SUFFIX)

    def read_mask(self, mask_path: Path) -> Image.Image:
        mask = open_image(mask_path, "mask")
        if not self.needs_conversion(mask_path):
            return mask
        if mask.mode not in MASK_MODES:
            raise ValueError(f"mask {mask_path} has mode {mask.mode!r}; Cityscapes labelIds are 8-bit grey PNGs")
        return Image.fromarray(label_ids_to_train_ids()[np.asarray(mask)])
