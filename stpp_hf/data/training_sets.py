"""The torch datasets of a run, over the ``datasets.Dataset``\\ s of :func:`~stpp_hf.data.load_source`.

Item format: a tuple ``(pixels, labels)``, class indices with 255 = ignore.

* :class:`SupOnlyDataset`, :class:`RetrainDataset` (through :class:`TrainTransform`): ``pixels``
  ``[3, crop, crop]`` uint8 RGB, ``labels`` ``[crop, crop]`` uint8. They batch with the default
  collate; the trainer makes model inputs of a batch on its device with
  :func:`~stpp_hf.data.normalization.normalize_batch` (float32, ImageNet-normalised) and ``labels.long()``.
* :class:`EvalDataset` (through :class:`EvalTransform`): ``pixel_values`` ``[3, H, W]`` float32
  ImageNet-normalised, ``labels`` ``[H, W]`` int64 (``None`` for an image without a mask); full
  images of varying size, batched by size (``stpp_hf.training.inference.same_size_batches``).

The id of item ``i`` is ``dataset.ids[i]``. Images and masks are read as stored, an EXIF orientation tag
ignored (:mod:`stpp_hf.data.images`): the datasets' image columns are read undecoded and decoded here,
not by ``datasets`` (which would turn a tagged image but not its mask).

* :class:`SupOnlyDataset`: the labeled images, listed twice when fewer than 200 (docs/method.md §2).
* :class:`RetrainDataset`: the labeled images repeated ``ceil(U / L)`` times, then the ``U``
  pseudo-labeled images, whose labels come from one or more :class:`PseudoLabelStore`\\ s (ST++ stage
  6 takes the reliable ids from stage 3's store and the unreliable ones from stage 5's). Only
  pseudo-labeled items get the strong transform. Which item is which is decided by index arithmetic
  and dict look-ups, never by ``id in list``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import open_image, undecoded
from .pseudo_labels import PseudoLabelStore
from .transforms import EvalTransform

SUPONLY_REPEAT_BELOW = 200

Transform = Callable[[Image.Image, "Image.Image | None"], tuple]


def suponly_length(num_labeled: int) -> int:
    """Items of a SupOnly epoch: the labeled images, twice when fewer than 200 (docs/method.md §2)."""
    return num_labeled * (2 if num_labeled < SUPONLY_REPEAT_BELOW else 1)


def retrain_length(num_labeled: int, num_pseudo_labeled: int) -> int:
    """Items of a re-training epoch: the labeled images ``ceil(U / L)`` times, then the ``U`` pseudo-labeled ones."""
    return num_labeled * math.ceil(num_pseudo_labeled / num_labeled) + num_pseudo_labeled


def _row_positions(source, what: str) -> dict[str, int]:
    """``{id: row}`` of a ``datasets.Dataset``; ``what`` names the set in errors."""
    ids = source["id"]
    if len(ids) == 0:
        raise ValueError(f"the {what} set is empty")
    return {image_id: row for row, image_id in enumerate(ids)}


def _read(row: dict, labeled: bool = False) -> tuple[Image.Image, "Image.Image | None"]:
    """The image and mask (``None`` when absent) of an undecoded row, as stored; ``labeled`` requires the mask."""
    if labeled and row["label"] is None:
        raise ValueError(f"labeled image {row['id']!r} has no mask")
    mask = None if row.get("label") is None else open_image(row["label"], "mask")
    return open_image(row["image"], "image"), mask


class EvalDataset(Dataset):
    """Full images of a ``datasets.Dataset`` through ``transform`` (default :class:`EvalTransform`)."""

    def __init__(self, source, transform: Transform | None = None):
        self.source = undecoded(source)
        self.transform = transform or EvalTransform()
        self.ids: list[str] = list(source["id"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.transform(*_read(self.source[index]))


class StreamedEvalDataset(Dataset):
    """:class:`EvalDataset` over the rows ``ids`` of an :class:`~stpp_hf.data.streamed.UnlabeledStream`, read
    once: ``self.ids`` is ``ids`` in row order, and process ``rank`` of ``world_size`` may only ask for its
    items ``rank, rank + world_size, ...`` in that order (what :func:`~stpp_hf.training.inference.shard_indices`
    and ``same_size_batches`` do); only those rows are decoded."""

    read_once_in_order = True  # no DataLoader workers: they would each ask for other items

    def __init__(self, stream, ids, rank: int = 0, world_size: int = 1, transform: Transform | None = None):
        self.ids: list[str] = stream.row_ordered(ids)
        self.transform = transform or EvalTransform()
        self._rows = stream.rows(self.ids, rank, world_size)
        self._next, self._step = rank, world_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        if index != self._next:
            raise IndexError(f"a streamed set is read once, in order: item {self._next} comes next, not {index}")
        row = next(self._rows)
        if row["id"] != self.ids[index]:
            raise RuntimeError(f"the stream gave {row['id']!r} for item {index}, {self.ids[index]!r}")
        self._next += self._step
        return self.transform(*_read(row))


class SupOnlyDataset(Dataset):
    """The labeled images (twice when fewer than 200) through ``transform``."""

    def __init__(self, labeled, transform: Transform):
        self.source, self.transform = undecoded(labeled), transform
        self.num_labeled = len(_row_positions(labeled, "labeled"))
        self.repeats = suponly_length(self.num_labeled) // self.num_labeled
        self.ids: list[str] = list(labeled["id"]) * self.repeats

    def __len__(self) -> int:
        return suponly_length(self.num_labeled)

    def __getitem__(self, index: int):
        return self.transform(*_read(self.source[index % self.num_labeled], labeled=True))


class RetrainDataset(Dataset):
    """Labeled images (weak transform) repeated ``ceil(U / L)`` times, then ``U`` pseudo-labeled
    unlabeled images (strong transform) whose labels come from ``pseudo_labels``.

    Args:
        labeled: ``datasets.Dataset`` of labeled images.
        unlabeled: ``datasets.Dataset`` of unlabeled images (its ``label`` column is not read).
        pseudo_labels: ``[(ids, store), ...]``; each id must be an unlabeled id and appear in exactly
            one entry. Pseudo-labeled items follow this order.
        weak_transform: for labeled items, e.g. ``FastTrainTransform(base, crop)``.
        strong_transform: for pseudo-labeled items, e.g. ``FastTrainTransform(base, crop, strong=True)``.
    """

    def __init__(
        self,
        labeled,
        unlabeled,
        pseudo_labels: Sequence[tuple[Sequence[str], PseudoLabelStore]],
        weak_transform: Transform,
        strong_transform: Transform,
    ):
        self.labeled = undecoded(labeled)
        self.unlabeled_images = undecoded(unlabeled.select_columns(["id", "image"]))
        self.weak_transform, self.strong_transform = weak_transform, strong_transform
        self.num_labeled = len(_row_positions(labeled, "labeled"))
        unlabeled_rows = _row_positions(unlabeled, "unlabeled")
        self.store_of: dict[str, PseudoLabelStore] = {}
        for ids, store in pseudo_labels:
            for image_id in ids:
                if image_id in self.store_of:
                    raise ValueError(
                        f"id {image_id!r} is in two pseudo-label sets ({self.store_of[image_id]} and {store})"
                    )
                if image_id not in unlabeled_rows:
                    raise ValueError(f"pseudo-labeled id {image_id!r} ({store}) is not in the unlabeled set")
                self.store_of[image_id] = store
        if not self.store_of:
            raise ValueError("RetrainDataset needs at least one pseudo-labeled id")
        self.pseudo_ids: list[str] = list(self.store_of)
        self.pseudo_rows: list[int] = [unlabeled_rows[image_id] for image_id in self.pseudo_ids]
        self.num_labeled_items = retrain_length(self.num_labeled, len(self.pseudo_ids)) - len(self.pseudo_ids)
        self.labeled_repeats = self.num_labeled_items // self.num_labeled

    @property
    def ids(self) -> list[str]:
        return list(self.labeled["id"]) * self.labeled_repeats + self.pseudo_ids

    def __len__(self) -> int:
        return retrain_length(self.num_labeled, len(self.pseudo_ids))

    def is_pseudo_labeled(self, index: int) -> bool:
        return index >= self.num_labeled_items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not self.is_pseudo_labeled(index):
            return self.weak_transform(*_read(self.labeled[index % self.num_labeled], labeled=True))
        position = index - self.num_labeled_items
        image_id = self.pseudo_ids[position]
        image, _ = _read(self.unlabeled_images[self.pseudo_rows[position]])
        label = self.store_of[image_id].open(image_id)
        if label.size != image.size:
            raise ValueError(
                f"pseudo label of {image_id!r} in {self.store_of[image_id]} is {label.size[0]}x{label.size[1]} "
                f"but the image is {image.size[0]}x{image.size[1]}"
            )
        return self.strong_transform(image, label)
