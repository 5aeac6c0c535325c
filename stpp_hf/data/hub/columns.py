"""Which columns of a ``datasets`` split hold the images and their class-index labels, and the checks of a row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature

from ...file_io import atomic_write_bytes, json_text
from ..images import MASK_MODES, undecoded
from ..sources.base import FEATURES, check_mask_values

LABEL_COLUMN_FALLBACK = "annotation"  # the column name of many Hub segmentation datasets (e.g. scene_parse_150)


class HubColumns:
    """Which columns of ``dataset_name`` hold images and labels, checked against a split's features."""

    def __init__(self, dataset_name: str, image_column: str, label_column: str):
        self.dataset_name, self.image, self.label = dataset_name, image_column, label_column

    def check(self, features, split: str) -> None:
        where = f"dataset {self.dataset_name!r}, split {split!r}"
        if self.label not in features and self.label == "label" and LABEL_COLUMN_FALLBACK in features:
            self.label = LABEL_COLUMN_FALLBACK
        for role, column in (("image", self.image), ("label", self.label)):
            if column not in features:
                raise ValueError(
                    f"{where} has no {role} column {column!r} (columns: {', '.join(features)}); "
                    f"name it with --{role}_column"
                )
            if not isinstance(features[column], ImageFeature):
                kind = "a class-index mask image per row" if role == "label" else "an image per row"
                raise ValueError(
                    f"{where}: column {column!r} is {features[column]!r}, not an Image feature; "
                    f"the {role} column must hold {kind}"
                )

    def where(self, split: str, index: int) -> str:
        """A row in words, for error messages."""
        return f"dataset {self.dataset_name!r}, split {split!r}, row {index}"

    def to_common(self, dataset: Dataset, ids: list[str]) -> Dataset:
        """``dataset``'s rows with the package's features ``id``, ``image``, ``label`` (no image is decoded)."""
        dataset = dataset.select_columns([self.image, self.label])
        renames = {old: new for old, new in ((self.image, "image"), (self.label, "label")) if old != new}
        if renames:
            dataset = dataset.rename_columns(renames)
        return dataset.add_column("id", ids).select_columns(list(FEATURES)).cast(FEATURES)


def label_values(split: Dataset | IterableDataset, column: str) -> Iterator[tuple[int, dict | None]]:
    """``(row index, undecoded label value or None)`` of every row of ``split``, in row order."""
    rows = undecoded(split.select_columns([column]), (column,))
    for index, row in enumerate(rows):
        yield index, row[column]


def rows_with_label(split: Dataset, column: str) -> list[bool]:
    """Whether each row of an in-memory split has a label, from its Arrow column (nothing is decoded)."""
    return np.logical_not(split.data.column(column).is_null().to_numpy(zero_copy_only=False)).tolist()


def check_label_row(row: dict, columns: HubColumns, num_labels: int, where: str) -> None:
    """Check one decoded row's label: mode, the image's size, values; errors name the row (``where``)."""
    image, label = row[columns.image], row[columns.label]
    if label.mode not in MASK_MODES:
        raise ValueError(
            f"{where}, column {columns.label!r}: the label has mode {label.mode!r}; expected a single-channel "
            f"image of class indices (mode {' or '.join(MASK_MODES)}), not a colour rendering"
        )
    if label.size != image.size:
        raise ValueError(
            f"{where}: image is {image.size[0]}x{image.size[1]} but its label ({columns.label!r}) is "
            f"{label.size[0]}x{label.size[1]}"
        )
    check_mask_values(np.asarray(label), num_labels, f"{where}, column {columns.label!r}")


def check_rows(rows: Dataset, indices: Sequence[int], columns: HubColumns, num_labels: int, split: str) -> None:
    """Decode and check every labeled row of ``rows`` (row ``indices[i]`` of ``split`` at position ``i``)."""
    for index, row in zip(indices, rows.select_columns([columns.image, columns.label])):
        if row[columns.label] is not None:
            check_label_row(row, columns, num_labels, columns.where(split, index))


def check_no_missing_label(rows: Dataset, columns: HubColumns, split: str) -> None:
    """Refuse rows of ``split`` (all of which must have a label) without one."""
    missing = [index for index, labeled in enumerate(rows_with_label(rows, columns.label)) if not labeled]
    if missing:
        raise ValueError(
            f"dataset {columns.dataset_name!r}, split {split!r}: rows {missing[:5]} have no {columns.label!r}"
        )


class RowChecks:
    """The parts whose every labeled row was decoded and checked, kept in ``validated.json`` by content hash: a
    relaunch on the same rows does not decode them again."""

    def __init__(self, path: Path, columns: HubColumns, num_labels: int):
        self.path, self.columns, self.num_labels = path, columns, num_labels
        self.done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def check(self, part: str, split: str, rows: Dataset, indices: Sequence[int], record: dict) -> None:
        """Check ``rows`` (row ``indices[i]`` of ``split`` at position ``i``) unless done for this content (``record``:
        their :func:`~stpp_hf.data.hub.identity.rows_record`)."""
        key = f"{part}:{split}:{record['content_sha256']}:{self.num_labels}"
        if self.done.get(key) != len(indices):
            check_rows(rows, indices, self.columns, self.num_labels, split)
            self.done[key] = len(indices)

    def save(self) -> None:
        atomic_write_bytes(self.path, json_text(self.done, str(self.path), indent=1).encode("utf-8"))
