"""The labeled / unlabeled partition of a train split: drawn once, kept in the run directory as lists of row ids.

``partition_dir`` holds ``labeled.txt`` and ``unlabeled.txt`` (one row id such as ``train/000123`` a line; files of
earlier versions add a second field, ``<id>/<label column>``, which is ignored) and ``partition.json``, the settings
the partition was drawn with: a relaunch with the same settings reads the partition, one with others is refused.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

from ...file_io import atomic_write_bytes, json_text
from ...models.deeplab.label_presets import IGNORE_INDEX
from ..splits import draw_labeled, read_split

PARTITION_FILE = "partition.json"
PARTS = ("labeled", "unlabeled")


@dataclass(frozen=True)
class Partition:
    """Row indices of the train split: the labeled rows and the unlabeled ones, each in row order, and the
    :func:`partition_settings` they were drawn with."""

    labeled: list[int]
    unlabeled: list[int]
    settings: dict


def parse_fraction(text: str | float) -> float:
    """``"1/16"``, ``"0.0625"`` or ``0.0625`` as a float in (0, 1)."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"labeled_fraction {text!r} is not a fraction such as '1/16' or 0.0625") from None
    if not 0 < value < 1:
        raise ValueError(f"labeled_fraction {text!r} must be between 0 and 1 (exclusive)")
    return value


def row_id(split: str, index: int) -> str:
    """The id of row ``index`` of ``split`` (e.g. ``train/000123``): stable for a given dataset revision."""
    return f"{split}/{index:06d}"


def row_index(image_id: str) -> int:
    return int(image_id.rsplit("/", 1)[1])


def partition_settings(
    dataset_name: str, dataset_config: str | None, train_split: str, num_labeled: int | None,
    labeled_fraction: str | None, partition_seed: int,
) -> dict:  # fmt: skip
    """What a partition depends on, the number of train rows aside (:func:`draw_partition` adds it);
    ``partition.json`` stores it and a relaunch must match it."""
    return {
        "dataset_name": dataset_name,
        "dataset_config": dataset_config,
        "train_split": train_split,
        "num_labeled": num_labeled,
        "labeled_fraction": labeled_fraction,
        "partition_seed": partition_seed,
    }


def hub_split_name(partition: dict) -> str:
    """The partition (``partition_settings`` less the dataset) in words, e.g. ``"train: 1/16 labeled, seed 0"``."""
    amount = partition["labeled_fraction"] if partition["num_labeled"] is None else partition["num_labeled"]
    return f"{partition['train_split']}: {amount} labeled, seed {partition['partition_seed']}"


def rarest_class_strata(present: Sequence[Sequence[int]]) -> list[str]:
    """One stratum per mask from the classes it shows (``present[i]``): the class, 255 aside, that the fewest
    masks show (ties: the lower id), ``"none"`` for a mask of ignore pixels only. Drawing in proportion to
    these strata gives rare classes labeled images as often as they occur, instead of leaving them to chance."""
    counts = Counter(value for classes in present for value in set(classes) if value != IGNORE_INDEX)
    strata = []
    for classes in present:
        kept = [value for value in set(classes) if value != IGNORE_INDEX]
        strata.append(str(min(kept, key=lambda value: (counts[value], value))) if kept else "none")
    return strata


def draw_partition(
    has_label: Sequence[bool],
    settings: dict,
    partition_dir: str | os.PathLike,
    strata: Callable[[list[int]], list[str]] | None = None,
) -> Partition:
    """Reuse or draw the partition of the train rows (``has_label[i]``: row ``i`` has a label) in ``partition_dir``.

    The draw among the rows with a label is stratified by ``strata(their row indices)`` (one key each, see
    :func:`rarest_class_strata`), only called when a partition is drawn."""
    settings = {**settings, "num_rows": len(has_label)}
    partition_dir = Path(partition_dir)
    recorded_path = partition_dir / PARTITION_FILE
    if recorded_path.is_file():
        _check_recorded(recorded_path, settings)
    else:
        labeled = _draw(has_label, settings, strata)
        unlabeled = [index for index in range(len(has_label)) if index not in labeled]
        partition_dir.mkdir(parents=True, exist_ok=True)
        for part, rows in zip(PARTS, (sorted(labeled), unlabeled)):
            _write_ids(partition_dir / f"{part}.txt", [row_id(settings["train_split"], index) for index in rows])
        atomic_write_bytes(recorded_path, json_text(settings, str(recorded_path), indent=1).encode("utf-8"))
    labeled, unlabeled = _read_partition(partition_dir, has_label, settings["dataset_name"])
    return Partition(labeled, unlabeled, settings)


def _check_recorded(recorded_path: Path, settings: dict) -> None:
    recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    differing = {key: (recorded.get(key), value) for key, value in settings.items() if recorded.get(key) != value}
    if differing:
        listed = "; ".join(f"{key}: recorded {old!r}, now {new!r}" for key, (old, new) in differing.items())
        raise ValueError(
            f"{recorded_path.parent} holds a partition drawn with other settings ({listed}); "
            "relaunch with the recorded settings or use another --output_dir"
        )


def _labeled_count(num_rows: int, settings: dict) -> int:
    if settings["num_labeled"] is not None and settings["labeled_fraction"] is not None:
        raise ValueError("give --num_labeled or --labeled_fraction, not both")
    if settings["num_labeled"] is not None:
        return settings["num_labeled"]
    if settings["labeled_fraction"] is not None:
        return round(parse_fraction(settings["labeled_fraction"]) * num_rows)
    raise ValueError(
        f"give --num_labeled N or --labeled_fraction F to partition the {num_rows} training rows of "
        f"{settings['dataset_name']!r}"
    )


def _draw(has_label: Sequence[bool], settings: dict, strata: Callable[[list[int]], list[str]] | None) -> set[int]:
    """The labeled row indices of a new partition."""
    num_rows = len(has_label)
    count = _labeled_count(num_rows, settings)
    described = f"{count} labeled of the {num_rows} rows of {settings['dataset_name']!r} [{settings['train_split']}]"
    if count < 1:
        raise ValueError(f"{described} leaves no labeled image; raise --num_labeled or --labeled_fraction")
    if count >= num_rows:
        raise ValueError(f"{described} leaves no unlabeled image; lower --num_labeled or --labeled_fraction")
    with_label = [index for index, labeled in enumerate(has_label) if labeled]
    if count > len(with_label):
        raise ValueError(f"{described}: only {len(with_label)} rows have a label")
    if count == len(with_label):
        return set(with_label)
    keys = None if strata is None else strata(with_label)
    return {
        with_label[position] for position in draw_labeled(len(with_label), count, settings["partition_seed"], keys)
    }


def _write_ids(path: Path, ids: list[str]) -> None:
    atomic_write_bytes(path, "".join(f"{image_id}\n" for image_id in ids).encode("utf-8"))


def _read_partition(partition_dir: Path, has_label: Sequence[bool], dataset_name: str) -> tuple[list, list]:
    """The stored partition, its row ids checked against the split (a labeled row must have a label)."""
    rows = {}
    for part in PARTS:
        path = partition_dir / f"{part}.txt"
        rows[part] = [_checked_index(entry.image, len(has_label), path) for entry in read_split(path)]
    without_label = [index for index in rows["labeled"] if not has_label[index]]
    if without_label:
        raise ValueError(
            f"{partition_dir / 'labeled.txt'}: rows {without_label[:5]} of {dataset_name!r} have no label"
        )
    return rows["labeled"], rows["unlabeled"]


def _checked_index(image_id: str, num_rows: int, path: Path) -> int:
    try:
        index = row_index(image_id)
    except (ValueError, IndexError):
        raise ValueError(f"{path}: {image_id!r} is not a row id like 'train/000123'") from None
    if not 0 <= index < num_rows:
        raise ValueError(f"{path}: row {index} is outside the {num_rows} rows of the train split")
    return index
