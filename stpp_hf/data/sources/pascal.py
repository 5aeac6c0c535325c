"""Pascal VOC 2012 (and the 10582-image augmented set): ``JPEGImages/*.jpg`` and class-index PNGs
(``SegmentationClass/`` palette PNGs or ``SegmentationClassAug/`` grey PNGs), 21 classes, 255 ignore.

The id of a sample is its image's file stem (``2007_000032``), as in the reference.
"""

from __future__ import annotations

from pathlib import Path

from ...models.deeplab.label_presets import PASCAL_VOC_CLASSES
from ..splits import SplitEntry
from .base import DatasetSource, Record


class PascalVOCSource(DatasetSource):
    name = "pascal"
    num_labels = 21
    class_names = PASCAL_VOC_CLASSES

    def record_for(self, root: Path, entry: SplitEntry) -> Record:
        mask = None if entry.mask is None else root / entry.mask
        return Record(Path(entry.image).stem, root / entry.image, mask)
