"""Loading a ``datasets`` segmentation dataset as a run's :class:`~stpp_hf.data.run_sources.RunSources`: in memory
(:func:`load_in_memory`) or streamed (:func:`load_streamed`), both through the steps of :class:`HubSplits`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, IterableDataset, load_dataset
from datasets import Image as ImageFeature

from ..images import open_image, undecoded
from ..run_sources import RunSources
from ..streamed import UnlabeledStream
from .classes import palette_of, resolve_id2label
from .columns import HubColumns, RowChecks, check_label_row, check_no_missing_label, label_values, rows_with_label
from .identity import dataset_revision, rows_record, stream_record
from .partition import (
    Partition,
    draw_partition,
    hub_split_name,
    partition_settings,
    rarest_class_strata,
    row_id,
    row_index,
)

VALIDATED_FILE = "validated.json"


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
) -> RunSources:
    """The labeled / unlabeled / val parts of a ``datasets`` segmentation dataset, partitioned in ``partition_dir``
    (the options of ``--dataset_name`` runs, ``id2label_file`` being ``--id2label``).

    Every labeled row of the labeled and val parts (and of the unlabeled part without ``streaming``) is
    decoded once and checked: label mode ``L``/``P``, the image's size, values in ``[0, C)`` and 255.
    Errors name the dataset, split, row and column. ``partition_dir`` is written by one process (run it
    under ``accelerator.main_process_first()``).
    """
    options = dict(
        dataset_name=dataset_name, dataset_config=dataset_config, image_column=image_column, label_column=label_column,
        train_split=train_split, val_split=val_split, num_labeled=num_labeled, labeled_fraction=labeled_fraction,
        partition_seed=partition_seed, id2label=id2label_file, streaming=streaming,
    )  # fmt: skip
    splits = HubSplits.open(options, cache_dir)
    fraction = None if labeled_fraction is None else str(labeled_fraction)
    settings = partition_settings(dataset_name, dataset_config, train_split, num_labeled, fraction, partition_seed)
    return (load_streamed if streaming else load_in_memory)(splits, settings, Path(partition_dir))


def load_in_memory(splits: HubSplits, settings: dict, partition_dir: Path) -> RunSources:
    """The parts as ``datasets.Dataset``\\ s; every labeled row of every part is checked."""
    train, columns = splits.train, splits.columns
    has_label = rows_with_label(train, columns.label)
    partition = draw_partition(has_label, settings, partition_dir, splits.strata)
    checks = splits.row_checks(partition_dir)
    labeled, val, identity = splits.labeled_and_val(train.select(partition.labeled), splits.val, partition, checks)
    unlabeled_rows, unlabeled_ids = train.select(partition.unlabeled), splits.train_ids(partition.unlabeled)
    identity["unlabeled"] = rows_record(unlabeled_rows, unlabeled_ids, (columns.image, columns.label))
    checks.check("unlabeled", splits.train_split, unlabeled_rows, partition.unlabeled, identity["unlabeled"])
    checks.save()
    unlabeled = columns.to_common(unlabeled_rows, unlabeled_ids)
    return splits.sources(labeled, unlabeled, val, identity, partition, has_label)


def load_streamed(splits: HubSplits, settings: dict, partition_dir: Path) -> RunSources:
    """Nothing downloaded first: one pass over the train split's label column finds the rows with a label (a
    second one, when the partition is drawn, reads their classes); the labeled rows and val are copied into
    memory (they are small); the unlabeled part is an :class:`~stpp_hf.data.streamed.UnlabeledStream`, whose rows
    are checked as they are read. Rows, their ids and the partition are those of :func:`load_in_memory`."""
    columns = splits.columns
    has_label = [value is not None for _, value in label_values(splits.train, columns.label)]
    partition = draw_partition(has_label, settings, partition_dir, splits.strata)
    checks = splits.row_checks(partition_dir)
    labeled_rows = _materialise(splits.train, columns, partition.labeled)
    labeled, val, identity = splits.labeled_and_val(labeled_rows, _materialise(splits.val, columns), partition, checks)
    checks.save()
    row_of = dict(zip(splits.train_ids(partition.unlabeled), partition.unlabeled))
    unlabeled = UnlabeledStream(
        splits.train, row_of, columns.image, columns.label, splits.stream_identity(), splits.stream_row_check()
    )
    identity["unlabeled"] = stream_record(unlabeled, splits.revision)
    return splits.sources(labeled, unlabeled, val, identity, partition, has_label)


@dataclass
class HubSplits:
    """The train and val splits of a load (``Dataset``\\ s, or ``IterableDataset``\\ s when streamed), their
    columns and classes, and the steps both ways of loading share."""

    options: dict  # the options of the load, as given (``unlabeled_source.json`` records them)
    columns: HubColumns
    train: Dataset | IterableDataset
    val: Dataset | IterableDataset
    id2label: dict[int, str]
    revision: str | None  # the Hub commit the dataset was loaded at (``None``: a local one, or offline)

    @classmethod
    def open(cls, options: dict, cache_dir: str | os.PathLike | None) -> HubSplits:
        name, train_split, val_split = options["dataset_name"], options["train_split"], options["val_split"]
        revision = dataset_revision(name)  # both splits are loaded at this commit, the one recorded
        load_kwargs = dict(name=options["dataset_config"], cache_dir=None if cache_dir is None else str(cache_dir))
        if revision is not None:
            load_kwargs["revision"] = revision
        train, val = (
            _load_split(name, split, load_kwargs, options["streaming"]) for split in (train_split, val_split)
        )
        columns = HubColumns(name, options["image_column"], options["label_column"])
        columns.check(train.features, train_split)
        columns.check(val.features, val_split)
        id2label = resolve_id2label(name, options["id2label"], train.features)
        return cls(options, columns, train, val, id2label, revision)

    @property
    def dataset_name(self) -> str:
        return self.options["dataset_name"]

    @property
    def train_split(self) -> str:
        return self.options["train_split"]

    @property
    def val_split(self) -> str:
        return self.options["val_split"]

    def train_ids(self, rows: list[int]) -> list[str]:
        return [row_id(self.train_split, index) for index in rows]

    def strata(self, rows: list[int]) -> list[str]:
        """The rarest-class stratum of each train row ``rows`` (one pass over the label column)."""
        wanted = set(rows)
        present = [
            np.unique(np.asarray(open_image(value, "mask"))).tolist()
            for index, value in label_values(self.train, self.columns.label)
            if index in wanted
        ]
        return rarest_class_strata(present)

    def row_checks(self, partition_dir: Path) -> RowChecks:
        return RowChecks(partition_dir / VALIDATED_FILE, self.columns, len(self.id2label))

    def labeled_and_val(
        self, labeled_rows: Dataset, val_rows: Dataset, partition: Partition, checks: RowChecks
    ) -> tuple[Dataset, Dataset, dict]:
        """The labeled and val parts (in-memory rows of the dataset's columns) checked, with the common features,
        and their identity records."""
        check_no_missing_label(val_rows, self.columns, self.val_split)
        names = (self.columns.image, self.columns.label)
        labeled_ids = self.train_ids(partition.labeled)
        val_indices = list(range(len(val_rows)))
        val_ids = [row_id(self.val_split, index) for index in val_indices]
        identity = {
            "labeled": rows_record(labeled_rows, labeled_ids, names),
            "val": rows_record(val_rows, val_ids, names),
        }
        checks.check("labeled", self.train_split, labeled_rows, partition.labeled, identity["labeled"])
        checks.check("val", self.val_split, val_rows, val_indices, identity["val"])
        return self.columns.to_common(labeled_rows, labeled_ids), self.columns.to_common(val_rows, val_ids), identity

    def stream_identity(self) -> dict:
        return {
            "dataset_name": self.dataset_name,
            "dataset_config": self.options["dataset_config"],
            "split": self.train_split,
        }

    def stream_row_check(self):
        """``check_row(row, id)`` of the streamed unlabeled rows (undecoded ``image`` / ``label`` values)."""
        columns, num_labels = self.columns, len(self.id2label)

        def check_row(row: dict, image_id: str) -> None:
            if row["label"] is not None:
                decoded = {columns.image: open_image(row["image"]), columns.label: open_image(row["label"], "mask")}
                check_label_row(decoded, columns, num_labels, columns.where(self.train_split, row_index(image_id)))

        return check_row

    def sources(
        self, labeled: Dataset, unlabeled, val: Dataset, identity: dict, partition: Partition, has_label: list[bool]
    ) -> RunSources:
        return RunSources(
            labeled=labeled,
            unlabeled=unlabeled,
            val=val,
            id2label=self.id2label,
            palette=palette_of(labeled, "label"),
            unlabeled_split=None,
            unlabeled_have_masks=all(has_label[index] for index in partition.unlabeled),
            identity={**identity, "id2label": {str(key): value for key, value in self.id2label.items()}},
            unlabeled_source={"kind": "hub", **self.options},
            metadata=self.metadata(partition.settings),
        )

    def metadata(self, settings: dict) -> dict:
        """What ``results.json`` says of the data: the dataset and its revision, its partition in words and in full."""
        partition = {key: value for key, value in settings.items() if key not in ("dataset_name", "dataset_config")}
        config = self.options["dataset_config"]
        name = self.dataset_name if config is None else f"{self.dataset_name} ({config})"
        hub_dataset = {
            "dataset_name": self.dataset_name,
            "dataset_config": config,
            "revision": self.revision,
            "image_column": self.columns.image,
            "label_column": self.columns.label,
            "train_split": self.train_split,
            "val_split": self.val_split,
            "partition": partition,
        }
        return {"dataset": name, "split": hub_split_name(partition), "hub_dataset": hub_dataset}


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


def _materialise(stream: IterableDataset, columns: HubColumns, indices: list[int] | None = None) -> Dataset:
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
