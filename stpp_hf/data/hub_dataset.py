"""A Hub segmentation dataset (or a local directory ``datasets.load_dataset`` reads) as the source of a run.

The dataset has an image column and a label column of class-index images, as in the transformers
semantic-segmentation examples (``image`` / ``label``, or ``annotation``). Its train split is partitioned
into labeled and unlabeled rows (``num_labeled`` or ``labeled_fraction``, ``partition_seed``) with
:func:`~stpp_hf.data.splits.generate_split`, stratified by each mask's rarest class (:func:`rarest_class_strata`);
the partition is written into the run directory as split files of row ids (``train/000123``) next to
``partition.json``, the options it was drawn with, so a relaunch reuses it, and a relaunch with other options
is refused. Rows of the train split without a label are always unlabeled. Class names come from
``--id2label FILE``, else the ``id2label.json`` that Hub segmentation datasets ship in their repo (or the local
directory), else a per-pixel ``ClassLabel`` feature (:func:`resolve_id2label`); the palette from the label PNGs
when they are palette images, else the VOC colour map.

Everything is loaded and cached by ``datasets``; the labeled, unlabeled and val parts are
``datasets.Dataset``\\ s with the package's common features (``id``, ``image``, ``label``). With
``streaming=True`` nothing is downloaded first and the unlabeled part is an
:class:`~stpp_hf.data.streamed.UnlabeledStream`, read lazily and sharded across processes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from datasets import ClassLabel, Dataset, Features, IterableDataset, load_dataset
from datasets import Image as ImageFeature

from ..file_io import atomic_write_bytes, json_text
from ..models.deeplab.label_presets import IGNORE_INDEX, PASCAL_VOC_PALETTE, flat_palette
from .images import MASK_MODES, open_image, undecoded
from .sources.base import FEATURES, check_mask_values, read_id2label_file
from .splits import SplitEntry, generate_split, read_split, write_split
from .streamed import UnlabeledStream

ID2LABEL_FILE = "id2label.json"
PARTITION_FILE = "partition.json"
VALIDATED_FILE = "validated.json"
LABEL_COLUMN_FALLBACK = "annotation"  # the column name of many Hub segmentation datasets (e.g. scene_parse_150)


@dataclass
class HubSources:
    """The parts of a run drawn from a ``datasets`` dataset; ``metadata`` goes into ``results.json``."""

    labeled: Dataset
    unlabeled: Dataset | UnlabeledStream  # an UnlabeledStream with ``streaming``
    val: Dataset
    unlabeled_entries: list[SplitEntry]  # one per unlabeled row, aligned with ``unlabeled["id"]``
    id2label: dict[int, str]
    palette: list[int]
    metadata: dict[str, Any]


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


class _Columns:
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

    def to_common(self, dataset: Dataset, ids: list[str]) -> Dataset:
        """``dataset``'s rows with the package's features ``id``, ``image``, ``label`` (no image is decoded)."""
        dataset = dataset.select_columns([self.image, self.label])
        renames = {old: new for old, new in ((self.image, "image"), (self.label, "label")) if old != new}
        if renames:
            dataset = dataset.rename_columns(renames)
        return dataset.add_column("id", ids).select_columns(list(FEATURES)).cast(FEATURES)


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


def check_label_row(row: dict, columns: _Columns, num_labels: int, where: str) -> None:
    """Decode one row's image and label and check the label's mode, size and values; errors name the row."""
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


def _validate_rows(
    dataset: Dataset, rows: list[int], columns: _Columns, num_labels: int, split: str, part: str, cache: dict,
    positions: list[int] | None = None,
) -> None:  # fmt: skip
    """Check every labeled row ``rows`` of ``split`` once (at ``positions`` of ``dataset``, default ``rows``);
    ``cache`` remembers the parts (by the dataset's fingerprint, which changes with its files) already checked
    in an earlier launch."""
    key = f"{part}:{split}:{dataset._fingerprint}:{num_labels}"
    if cache.get(key) == len(rows):
        return
    selected = dataset.select_columns([columns.image, columns.label]).select(rows if positions is None else positions)
    for index, row in zip(rows, selected):
        if row[columns.label] is not None:
            check_label_row(
                row, columns, num_labels, f"dataset {columns.dataset_name!r}, split {split!r}, row {index}"
            )
    cache[key] = len(rows)


def _palette_of(dataset: Dataset, index: int, columns: _Columns) -> list[int]:
    """The palette of the label PNGs when they are palette images, else the VOC colour map."""
    label = dataset[index][columns.label]
    palette = label.getpalette() if label is not None and label.mode == "P" else None
    return flat_palette(palette or PASCAL_VOC_PALETTE)


def partition_settings(
    dataset_name: str, dataset_config: str | None, train_split: str, num_labeled: int | None,
    labeled_fraction: str | None, partition_seed: int, num_rows: int,
) -> dict:  # fmt: skip
    """What a partition depends on; ``partition.json`` stores it and a relaunch must match it."""
    return {
        "dataset_name": dataset_name,
        "dataset_config": dataset_config,
        "train_split": train_split,
        "num_labeled": num_labeled,
        "labeled_fraction": labeled_fraction,
        "partition_seed": partition_seed,
        "num_rows": num_rows,
    }


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
    entries: list[SplitEntry],
    settings: dict,
    partition_dir: str | os.PathLike,
    strata: Callable[[list[SplitEntry]], list[str]] | None = None,
) -> dict[str, Path]:
    """Reuse or draw the labeled / unlabeled partition of ``entries`` (one per train row, ``mask`` None for
    rows without a label) in ``partition_dir``; returns ``{"labeled", "unlabeled"}`` split files.

    The draw among the rows with a label is stratified by ``strata(those entries)`` (one key each, see
    :func:`rarest_class_strata`), only called when a partition is drawn."""
    partition_dir = Path(partition_dir)
    files = {part: partition_dir / f"{part}.txt" for part in ("labeled", "unlabeled")}
    recorded_path = partition_dir / PARTITION_FILE
    if recorded_path.is_file():
        recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        differing = {key: (recorded.get(key), value) for key, value in settings.items() if recorded.get(key) != value}
        if differing:
            listed = "; ".join(f"{key}: recorded {old!r}, now {new!r}" for key, (old, new) in differing.items())
            raise ValueError(
                f"{partition_dir} holds a partition drawn with other settings ({listed}); "
                "relaunch with the recorded settings or use another --output_dir"
            )
        return files
    num_rows = len(entries)
    dataset = settings["dataset_name"]
    if settings["num_labeled"] is not None and settings["labeled_fraction"] is not None:
        raise ValueError("give --num_labeled or --labeled_fraction, not both")
    if settings["num_labeled"] is not None:
        count = settings["num_labeled"]
    elif settings["labeled_fraction"] is not None:
        count = round(parse_fraction(settings["labeled_fraction"]) * num_rows)
    else:
        raise ValueError(
            f"give --num_labeled N or --labeled_fraction F to partition the {num_rows} training rows of {dataset!r}"
        )
    described = f"{count} labeled of the {num_rows} rows of {dataset!r} [{settings['train_split']}]"
    if count < 1:
        raise ValueError(f"{described} leaves no labeled image; raise --num_labeled or --labeled_fraction")
    if count >= num_rows:
        raise ValueError(f"{described} leaves no unlabeled image; lower --num_labeled or --labeled_fraction")
    with_label = [entry for entry in entries if entry.mask is not None]
    if count > len(with_label):
        raise ValueError(f"{described}: only {len(with_label)} rows have a label")
    if count < len(with_label):
        keys = None if strata is None else strata(with_label)
        generate_split(with_label, partition_dir, num_labeled=count, seed=settings["partition_seed"], strata=keys)
        labeled = {entry.image for entry in read_split(files["labeled"])}
    else:
        labeled = {entry.image for entry in with_label}
        write_split(files["labeled"], with_label)
    # rows without a label are unlabeled too, in row order
    write_split(files["unlabeled"], [entry for entry in entries if entry.image not in labeled])
    atomic_write_bytes(recorded_path, json_text(settings, str(recorded_path), indent=1).encode("utf-8"))
    return files


def load_hub_sources(
    dataset_name: str,
    partition_dir: str | os.PathLike,
    *,
    dataset_config: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    train_split: str = "train",
    val_split: str = "validation",
    num_labeled: int | None = None,
    labeled_fraction: str | float | None = None,
    partition_seed: int = 0,
    id2label_file: str | os.PathLike | None = None,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> HubSources:
    """The labeled / unlabeled / val parts of a ``datasets`` segmentation dataset, partitioned in ``partition_dir``.

    Every labeled row of the labeled and val parts (and of the unlabeled part without ``streaming``) is
    decoded once and checked: label mode ``L``/``P``, the image's size, values in ``[0, C)`` and 255.
    Errors name the dataset, split, row and column. ``partition_dir`` is written by one process (run it
    under ``accelerator.main_process_first()``).

    With ``streaming`` nothing is downloaded first: the train and val splits are ``IterableDataset``\\ s; one pass
    over the train split's label column finds the rows with a label (a second one, when the partition is drawn,
    reads their classes); the labeled rows and val are copied into memory (they are small); the unlabeled part
    is an :class:`~stpp_hf.data.streamed.UnlabeledStream`, whose rows are checked as they are read. Rows, their
    ids and the partition are those of the in-memory path.
    """
    load_kwargs = dict(name=dataset_config, cache_dir=None if cache_dir is None else str(cache_dir))
    train = _load_split(dataset_name, train_split, load_kwargs, streaming)
    val = _load_split(dataset_name, val_split, load_kwargs, streaming)
    columns = _Columns(dataset_name, image_column, label_column)
    columns.check(train.features, train_split)
    columns.check(val.features, val_split)
    id2label = resolve_id2label(dataset_name, id2label_file, train.features)

    # which train rows have a label: the Arrow column in memory, one pass over the undecoded column when streamed
    if streaming:
        has_label = np.array([value is not None for _, value in _label_values(train, columns.label)], dtype=bool)
    else:
        has_label = np.logical_not(train.data.column(columns.label).is_null().to_numpy(zero_copy_only=False))
    entries = [
        SplitEntry(row_id(train_split, index), f"{row_id(train_split, index)}/{columns.label}" if labeled else None)
        for index, labeled in enumerate(has_label.tolist())
    ]
    fraction = None if labeled_fraction is None else str(labeled_fraction)
    settings = partition_settings(
        dataset_name, dataset_config, train_split, num_labeled, fraction, partition_seed, len(entries)
    )

    def strata(labeled: list[SplitEntry]) -> list[str]:
        wanted = {row_index(entry.image) for entry in labeled}
        present = [
            np.unique(np.asarray(open_image(value, "mask"))).tolist()
            for index, value in _label_values(train, columns.label)
            if index in wanted
        ]
        return rarest_class_strata(present)

    files = draw_partition(entries, settings, partition_dir, strata)
    parts = {part: read_split(path) for part, path in files.items()}
    indices = {
        part: [_checked_index(entry, len(entries), path) for entry in parts[part]] for part, path in files.items()
    }
    unlabeled_without_label = [i for i in indices["labeled"] if not has_label[i]]
    if unlabeled_without_label:
        raise ValueError(f"{files['labeled']}: rows {unlabeled_without_label[:5]} of {dataset_name!r} have no label")
    labeled_rows = _materialise(train, columns, indices["labeled"]) if streaming else train
    labeled_positions = list(range(len(indices["labeled"]))) if streaming else indices["labeled"]
    if streaming:
        val = _materialise(val, columns, None)
    val_missing = np.flatnonzero(val.data.column(columns.label).is_null().to_numpy(zero_copy_only=False))
    if len(val_missing):
        raise ValueError(
            f"dataset {dataset_name!r}, split {val_split!r}: rows {val_missing[:5].tolist()} have no {columns.label!r}"
        )

    validated_path = Path(partition_dir) / VALIDATED_FILE
    validated = json.loads(validated_path.read_text(encoding="utf-8")) if validated_path.is_file() else {}
    num_labels = len(id2label)
    _validate_rows(
        labeled_rows, indices["labeled"], columns, num_labels, train_split, "labeled", validated, labeled_positions
    )
    _validate_rows(val, list(range(len(val))), columns, num_labels, val_split, "val", validated)
    if not streaming:
        _validate_rows(train, indices["unlabeled"], columns, num_labels, train_split, "unlabeled", validated)
    atomic_write_bytes(validated_path, json_text(validated, str(validated_path), indent=1).encode("utf-8"))

    labeled = columns.to_common(labeled_rows.select(labeled_positions), [entry.image for entry in parts["labeled"]])
    if streaming:

        def check_row(row: dict, image_id: str) -> None:
            if row["label"] is not None:
                decoded = {columns.image: open_image(row["image"]), columns.label: open_image(row["label"], "mask")}
                where = f"dataset {dataset_name!r}, split {train_split!r}, row {row_index(image_id)}"
                check_label_row(decoded, columns, num_labels, where)

        identity = {"dataset_name": dataset_name, "dataset_config": dataset_config, "split": train_split}
        row_of = {entry.image: index for entry, index in zip(parts["unlabeled"], indices["unlabeled"])}
        unlabeled = UnlabeledStream(train, row_of, columns.image, columns.label, identity, check_row)
    else:
        unlabeled = columns.to_common(
            train.select(indices["unlabeled"]), [entry.image for entry in parts["unlabeled"]]
        )
    metadata = {
        "dataset_name": dataset_name,
        "dataset_config": dataset_config,
        "image_column": columns.image,
        "label_column": columns.label,
        "train_split": train_split,
        "val_split": val_split,
        "partition": {key: value for key, value in settings.items() if key not in ("dataset_name", "dataset_config")},
    }
    return HubSources(
        labeled=labeled,
        unlabeled=unlabeled,
        val=columns.to_common(val, [row_id(val_split, index) for index in range(len(val))]),
        unlabeled_entries=parts["unlabeled"],
        id2label=id2label,
        palette=_palette_of(labeled_rows, labeled_positions[0], columns),
        metadata=metadata,
    )


def _load_split(
    dataset_name: str, split: str, load_kwargs: dict, streaming: bool = False
) -> Dataset | IterableDataset:
    try:
        loaded = load_dataset(dataset_name, split=split, streaming=streaming, **load_kwargs)
    except ValueError as error:
        if "Unknown split" not in str(error) and "Bad split" not in str(error):
            raise
        raise ValueError(
            f"dataset {dataset_name!r} has no split {split!r} ({error}); name one with --train_split / --val_split"
        ) from error
    if loaded.features is None:
        raise ValueError(
            f"dataset {dataset_name!r}, split {split!r}: the stream declares no features (column types); "
            "--streaming needs a dataset whose files carry them (parquet or arrow), or leave --streaming out"
        )
    return loaded


def _label_values(split: Dataset | IterableDataset, column: str) -> Iterator[tuple[int, dict | None]]:
    """``(row index, undecoded label value or None)`` of every row of ``split``, in row order."""
    rows = undecoded(split.select_columns([column]), (column,))
    for index, row in enumerate(rows):
        yield index, row[column]


def _materialise(stream: IterableDataset, columns: _Columns, indices: list[int] | None) -> Dataset:
    """The rows ``indices`` (all for ``None``) of a streamed split, in that order, as an in-memory ``Dataset`` of
    its image and label columns (encoded images, as stored)."""
    names = [columns.image, columns.label]
    wanted = None if indices is None else set(indices)
    found: dict[int, dict] = {}
    for index, row in enumerate(undecoded(stream.select_columns(names), tuple(names))):
        if wanted is None or index in wanted:
            found[index] = row
            if wanted is not None and len(found) == len(wanted):
                break
    order = sorted(found) if indices is None else indices
    features = Features({name: ImageFeature() for name in names})
    return Dataset.from_dict({name: [found[index][name] for index in order] for name in names}, features=features)


def _checked_index(entry: SplitEntry, num_rows: int, path: Path) -> int:
    try:
        index = row_index(entry.image)
    except (ValueError, IndexError):
        raise ValueError(f"{path}: {entry.image!r} is not a row id like 'train/000123'") from None
    if not 0 <= index < num_rows:
        raise ValueError(f"{path}: row {index} is outside the {num_rows} rows of the train split")
    return index


def hub_split_name(metadata: dict) -> str:
    """The partition in words, e.g. ``"train: 1/16 labeled, seed 0"``, from :attr:`HubSources.metadata`."""
    partition = metadata["partition"]
    amount = partition["labeled_fraction"] if partition["num_labeled"] is None else partition["num_labeled"]
    return f"{partition['train_split']}: {amount} labeled, seed {partition['partition_seed']}"


def load_hub_run_sources(args, partition_dir: str | os.PathLike, accelerator) -> tuple[dict, dict, list, str]:
    """What ``train_stpp.py`` needs from ``args`` (an object with the Hub data options as attributes, such as
    :class:`~stpp_hf.training.options.HubDataArguments`): ``(sources, id2label, palette, name)``, ``sources`` holding
    ``labeled``, ``unlabeled``, ``val``, ``unlabeled_entries`` and ``metadata`` (for ``results.json``).

    The partition lives in ``partition_dir`` (a run's ``RunLayout.partition``); the main process draws it (and
    fills ``datasets``' cache) first, the others then read it.
    """
    with accelerator.main_process_first():
        hub = load_hub_sources(
            args.dataset_name,
            partition_dir,
            dataset_config=args.dataset_config,
            image_column=args.image_column,
            label_column=args.label_column,
            train_split=args.train_split,
            val_split=args.val_split,
            num_labeled=args.num_labeled,
            labeled_fraction=args.labeled_fraction,
            partition_seed=args.partition_seed,
            id2label_file=args.id2label,
            streaming=args.streaming,
        )
    sources = {
        "labeled": hub.labeled,
        "unlabeled": hub.unlabeled,
        "val": hub.val,
        "unlabeled_entries": hub.unlabeled_entries,
        "metadata": hub.metadata,
    }
    name = args.dataset_name if args.dataset_config is None else f"{args.dataset_name} ({args.dataset_config})"
    return sources, hub.id2label, hub.palette, name
