"""Dataset sources as ``datasets`` objects: ``load_source(name, root, split_file)``.

Every source yields the features ``id`` (string), ``image`` (``Image()``) and ``label`` (``Image()``,
``None`` for an unlabeled image without a mask). Sources are registered in :data:`SOURCES`
(``pascal``, ``cityscapes``, ``folder``); add one with :func:`register_source`.

The method reads images and masks as stored (:mod:`stpp_hf.data.images`): validation does, and so do the
training sets, which decode rows themselves. ``datasets`` turns an image with an EXIF orientation tag when
it decodes a row, so read rows for the method with ``images.open_image(images.undecoded(dataset)[i]["image"])``.

The map-style dataset is built once with ``Dataset.from_generator`` under a fingerprint of the root,
split file contents and file list (sizes and mtimes), so a changed split or file rebuilds it. With
``streaming=True`` an ``IterableDataset`` with one shard per image is returned instead; give it to
``accelerator.prepare(DataLoader(...))`` as is (Accelerate splits it across processes), or call
``datasets.distributed.split_dataset_by_node`` yourself when you iterate without Accelerate — never
both, or each process sees only ``1/N²`` of the data.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, IterableDataset
from datasets.exceptions import DatasetGenerationError

from ..splits import read_split_text, resolve_split_file
from .base import FEATURES, DatasetSource, Record, check_not_binary_export, fingerprint, iter_rows
from .cityscapes import CityscapesSource
from .folder import FolderSource, read_id2label
from .pascal import PascalVOCSource

SOURCES: dict[str, type[DatasetSource]] = {}


def register_source(source_class: type[DatasetSource]) -> type[DatasetSource]:
    """Register a :class:`DatasetSource` subclass under its ``name`` (usable as a decorator)."""
    if not source_class.name:
        raise ValueError(f"{source_class.__name__} has no name")
    SOURCES[source_class.name] = source_class
    return source_class


for _source_class in (PascalVOCSource, CityscapesSource, FolderSource):
    register_source(_source_class)


def get_source(name: str, num_labels: int | None = None) -> DatasetSource:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset source {name!r}; registered: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](num_labels=num_labels)


def load_source(
    name: str,
    root: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    *,
    num_labels: int | None = None,
    require_masks: bool = False,
    validate: bool = True,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """The samples of ``split_file`` under ``root`` as a ``datasets.Dataset`` (or ``IterableDataset``).

    Args:
        name: a registered source (``"pascal"``, ``"cityscapes"``, ``"folder"``).
        root: dataset root; split paths are relative to it.
        split_file: a split file path or a shipped split name (``"pascal/1_16/split_0/labeled"``);
            optional for ``folder`` (then every image is listed).
        num_labels: number of classes, for the mask value check (default: the source's own).
        require_masks: every sample must have a mask (labeled and val sets).
        validate: decode every image and mask once while building and check readability, equal
            sizes, mask encoding (no JPEG), mode and values, and that not every mask holds only 0 and 255
            (a binary export whose foreground would be ignored); errors name the file. Missing files are
            always errors.
        streaming: return an ``IterableDataset`` (validated lazily, while iterating).
        cache_dir: where ``datasets`` keeps the built Arrow table (default: its own cache).
        num_proc: processes that build (and validate) the table.
    """
    source = get_source(name, num_labels)
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    split_path = None if split_file is None else resolve_split_file(split_file)
    records = source.records(root, split_path)
    if require_masks:
        unlabeled = [record for record in records if record.mask is None]
        if unlabeled:
            raise ValueError(
                f"{split_path or root}: {len(unlabeled)} images have no mask (first: {unlabeled[0].image}), "
                "but masks are required"
            )
    if validate:
        check_not_binary_export(source, records, str(split_path or root))
    gen_kwargs = {"source": source, "records": records, "validate": validate}
    if streaming:
        return IterableDataset.from_generator(iter_rows, features=FEATURES, gen_kwargs=gen_kwargs)
    split_text = read_split_text(split_path) if split_path is not None else ""
    try:
        return Dataset.from_generator(
            iter_rows,
            features=FEATURES,
            gen_kwargs=gen_kwargs,
            cache_dir=None if cache_dir is None else str(cache_dir),
            num_proc=num_proc,
            fingerprint=fingerprint(source, root, split_text, records, validate),
        )
    except DatasetGenerationError as error:
        # datasets wraps the generator's exception; surface ours (it names the bad file) directly
        cause = error.__cause__
        if isinstance(cause, (ValueError, OSError, ImportError)):
            raise cause.with_traceback(cause.__traceback__) from None
        raise


__all__ = [
    "SOURCES",
    "CityscapesSource",
    "DatasetSource",
    "FolderSource",
    "PascalVOCSource",
    "Record",
    "get_source",
    "load_source",
    "read_id2label",
    "register_source",
]
