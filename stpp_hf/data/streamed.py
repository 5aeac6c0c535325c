"""The unlabeled rows of a ``datasets`` split read lazily (``--streaming``), and the local copies retraining reads.

Selection scores every unlabeled image once and pseudo-labeling labels each once, so both read the rows
from a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``) without downloading the split
first. Each process reads the rows at positions ``rank::world_size`` of the ids it is given (sorted in row
order): the assignment of :func:`~stpp_hf.training.inference.shard_indices`, so a streamed pass batches
exactly the images an in-memory pass batches and gives bit-identical scores and labels. (Not
``datasets.distributed.split_dataset_by_node``: when a split has a multiple of ``world_size`` files it hands
out whole files, another assignment, hence other batches.)

The images must be stored in the dataset's files (Hub parquet / arrow) or in local files; the copies keep
their encoded bytes as they are (under a ``.png`` name, which only names the file: PIL reads the content).

Retraining needs random access to the pseudo-labeled images, so the labeling stage first copies the encoded
bytes of each image it labels (and of its mask, when the row has one, for the pseudo-label mIoU) into the
run directory, in two :class:`~stpp_hf.data.pseudo_labels.PseudoLabelStore`\\ s (atomic files, journals,
checksums; a killed fetch resumes with the ids still missing), and labels them from there;
:meth:`UnlabeledStream.local_dataset` gives them to retraining as a ``datasets.Dataset``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from datasets import Dataset, IterableDataset

from ..file_io import sha256_json
from .images import open_image, undecoded
from .pseudo_labels import PseudoLabelStore
from .sources.base import FEATURES

IMAGES_DIR, MASKS_DIR = "images", "masks"


class UnlabeledStream:
    """The unlabeled rows of a split, read lazily.

    Args:
        stream: the split as an ``IterableDataset``, rows in the split's order.
        row_of: ``{id: row index in the split}`` of the unlabeled rows, in row order.
        image_column, label_column: the split's columns.
        identity: what names the data (dataset, configuration, split).
        check_row: ``check_row(row, id)`` raises for a bad row ``{"id", "image", "label"}`` (undecoded values).
    """

    def __init__(
        self,
        stream: IterableDataset,
        row_of: dict[str, int],
        image_column: str,
        label_column: str,
        identity: dict,
        check_row: Callable[[dict, str], None],
    ):
        self.stream, self.row_of, self.check_row = stream, row_of, check_row
        self.image_column, self.label_column, self.identity = image_column, label_column, identity
        self.ids: list[str] = list(row_of)

    def __len__(self) -> int:
        return len(self.ids)

    def row_ordered(self, ids: Sequence[str]) -> list[str]:
        """``ids`` sorted in the split's row order (the order the stream yields them); unknown ids are an error."""
        unknown = [image_id for image_id in ids if image_id not in self.row_of]
        if unknown:
            raise ValueError(f"ids {unknown[:3]} are not unlabeled rows of {self.identity}")
        return sorted(ids, key=self.row_of.__getitem__)

    def rows(self, ids: Sequence[str], rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """The rows ``{"id", "image", "label"}`` (undecoded image values; label ``None`` without a mask) at
        positions ``rank::world_size`` of ``row_ordered(ids)``, in that order, each checked by ``check_row``."""
        mine = {self.row_of[image_id]: image_id for image_id in self.row_ordered(ids)[rank::world_size]}
        if not mine:
            return
        columns = (self.image_column, self.label_column)
        found = 0
        for index, row in enumerate(undecoded(self.stream.select_columns(list(columns)), columns)):
            image_id = mine.get(index)
            if image_id is None:
                continue
            common = {"id": image_id, "image": row[self.image_column], "label": row[self.label_column]}
            self.check_row(common, image_id)
            yield common
            found += 1
            if found == len(mine):
                return
        raise ValueError(f"the stream of {self.identity} ended before row {max(mine)}: the split has fewer rows now")

    def stores(self, directory: str | os.PathLike) -> tuple[PseudoLabelStore, PseudoLabelStore]:
        """The image and mask stores under ``directory`` (tied to the dataset's identity)."""
        fingerprint = sha256_json(self.identity)
        directory = Path(directory)
        return (
            PseudoLabelStore(directory / IMAGES_DIR, fingerprint=fingerprint),
            PseudoLabelStore(directory / MASKS_DIR, fingerprint=fingerprint),
        )

    def fetch(self, ids: Sequence[str], directory: str | os.PathLike, rank: int = 0, world_size: int = 1) -> int:
        """Copy this process's share of the images of ``ids`` (and their masks) that ``directory`` lacks, as
        stored; returns how many it copied. Call :meth:`verify` once every process is done."""
        images, masks = self.stores(directory)
        pending = set(images.pending(ids))  # an image is written after its mask: present means complete
        if not pending:
            return 0
        copied = 0
        for row in self.rows(ids, rank, world_size):
            if row["id"] not in pending:
                continue
            if row["label"] is not None:
                _copy(masks, row["id"], row["label"], "mask")
            _copy(images, row["id"], row["image"], "image")
            copied += 1
        return copied

    def verify(self, ids: Sequence[str], directory: str | os.PathLike) -> None:
        """Check that ``directory`` holds intact copies of the images of ``ids``, and of the masks they have."""
        images, masks = self.stores(directory)
        images.verify(ids)
        masks.verify([image_id for image_id in ids if image_id in masks])

    def local_dataset(self, ids: Sequence[str], directory: str | os.PathLike) -> Dataset:
        """The fetched rows of ``ids`` (in that order) as a ``datasets.Dataset`` with the common features."""
        images, masks = self.stores(directory)
        rows = {
            "id": list(ids),
            "image": [{"path": str(images.file_path(image_id)), "bytes": None} for image_id in ids],
            "label": [
                {"path": str(masks.file_path(image_id)), "bytes": None} if image_id in masks else None
                for image_id in ids
            ],
        }
        return Dataset.from_dict(rows, features=FEATURES)


def _copy(store: PseudoLabelStore, image_id: str, value: dict, what: str) -> None:
    """Write the encoded bytes of a ``datasets`` image value into ``store`` (a path value is read first)."""
    payload = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    width, height = open_image(value, what).size
    store.put_encoded(image_id, payload, width=width, height=height)
