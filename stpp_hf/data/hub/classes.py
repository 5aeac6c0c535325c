"""The class names of a ``datasets`` segmentation dataset and the colours its masks are drawn with."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import ClassLabel, Dataset

from ...models.deeplab.label_presets import PASCAL_VOC_PALETTE, flat_palette
from ..sources.base import read_id2label_file

ID2LABEL_FILE = "id2label.json"


def class_label_names(features) -> list[str] | None:
    """Class names of a per-pixel ``ClassLabel`` in ``features``: one nested in a ``Sequence`` / ``List``
    (class indices per pixel or per segment). A top-level ``ClassLabel`` names a whole image's category
    (e.g. scene_parse_150's ``scene_category``), not the mask's classes, and is never used. ``None`` when there
    is none; a ``ValueError`` when several disagree."""
    found = []

    def visit(feature, nested: bool) -> None:
        if isinstance(feature, ClassLabel):
            if nested:
                found.append(list(feature.names))
        elif isinstance(feature, dict):
            for child in feature.values():
                visit(child, nested)
        elif isinstance(feature, (list, tuple)):
            for child in feature:
                visit(child, True)
        elif hasattr(feature, "feature"):  # Sequence, List, LargeList
            visit(feature.feature, True)

    for feature in features.values():
        visit(feature, False)
    distinct = [names for index, names in enumerate(found) if names not in found[:index]]
    if len(distinct) > 1:
        raise ValueError(f"the dataset's features hold {len(distinct)} different per-pixel ClassLabel name lists")
    return distinct[0] if distinct else None


def resolve_id2label(dataset_name: str, id2label_file: str | os.PathLike | None, features=None) -> dict[int, str]:
    """Class names, first found of: ``id2label_file``; ``id2label.json`` of the local directory or the Hub dataset
    repo; the names of a per-pixel ``ClassLabel`` in ``features`` (:func:`class_label_names`). When the repo's
    ``id2label.json`` and such a ``ClassLabel`` both exist they must name as many classes (else: pass --id2label).
    Masks are checked against the number of classes chosen here (values in ``[0, C)`` and 255)."""
    if id2label_file is not None:
        return read_id2label_file(id2label_file)
    try:
        names = None if features is None else class_label_names(features)
    except ValueError as error:
        raise ValueError(f"dataset {dataset_name!r}: {error}; pass --id2label FILE") from None
    shipped = _shipped_id2label(dataset_name)
    if shipped is not None and names is not None and len(shipped) != len(names):
        raise ValueError(
            f"dataset {dataset_name!r}: its {ID2LABEL_FILE} names {len(shipped)} classes but its ClassLabel feature "
            f"{len(names)}; pass --id2label FILE to say which holds"
        )
    if shipped is not None:
        return shipped
    if names is not None:
        return dict(enumerate(names))
    raise FileNotFoundError(
        f"dataset {dataset_name!r} ships no {ID2LABEL_FILE} to name its classes; pass --id2label FILE (a JSON "
        'object {"0": "background", "1": "...", ...}); its features hold no per-pixel ClassLabel either'
    )


def _shipped_id2label(dataset_name: str) -> dict[int, str] | None:
    """``id2label.json`` of the local directory or the Hub dataset repo, ``None`` when there is none."""
    if Path(dataset_name).is_dir():
        local = Path(dataset_name) / ID2LABEL_FILE
        return read_id2label_file(local) if local.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return read_id2label_file(hf_hub_download(dataset_name, ID2LABEL_FILE, repo_type="dataset"))
    except EntryNotFoundError:
        return None


def palette_of(labeled: Dataset, label_column: str) -> list[int]:
    """The palette of the label PNGs (the first labeled row's) when they are palette images, else the VOC map."""
    label = labeled[0][label_column]
    palette = label.getpalette() if label is not None and label.mode == "P" else None
    return flat_palette(palette or PASCAL_VOC_PALETTE)
