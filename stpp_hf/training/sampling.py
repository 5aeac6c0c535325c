"""Which training items an epoch draws, and each item's augmentation randomness.

An epoch is a permutation of the training set, seeded by the epoch's seed and cut to whole global
batches, so the steps per epoch depend only on the global batch. Each item is drawn as
``(epoch_seed, index)`` and its augmentations are drawn from torch's CPU generator seeded with those
two numbers alone (the transforms themselves are unchanged), so the batches are the same for any
number of DataLoader workers or processes. Of the process's own generator (which dropout draws from) loading
takes one number per epoch, whatever the number of workers (:func:`training_loader`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def item_seed(epoch_seed: int, index: int) -> int:
    """A 63-bit seed of ``(epoch_seed, index)`` (well mixed: neighbouring items get unrelated streams)."""
    return int(np.random.SeedSequence([epoch_seed, index]).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler(Sampler):
    """Yields ``(epoch_seed, index)`` for a permutation of ``range(num_items)`` seeded by the epoch seed
    (set by :meth:`set_epoch`), cut to ``num_items // global_batch_size`` whole global batches."""

    def __init__(self, num_items: int, global_batch_size: int):
        self.num_items, self.global_batch_size = num_items, global_batch_size
        self.epoch_seed = 0

    def set_epoch(self, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return self.num_items // self.global_batch_size * self.global_batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.epoch_seed)
        order = torch.randperm(self.num_items, generator=generator)[: len(self)]
        for index in order.tolist():
            yield self.epoch_seed, index


class SeededItems(Dataset):
    """``dataset[index]`` with torch's CPU generator seeded by :func:`item_seed` while it is made
    (the caller's generator state is restored afterwards). Keys are :class:`EpochSampler`'s pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch_seed, index = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed CUDA's, which fork_rng does not restore
            torch.default_generator.manual_seed(item_seed(epoch_seed, index))
            return self.dataset[index]


def training_loader(
    dataset, global_batch_size: int, per_device_batch_size: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """The (unprepared) training DataLoader of one process: batches of ``per_device_batch_size`` items
    of ``dataset`` as drawn by :class:`EpochSampler`; ``accelerate.prepare`` shards them over the
    processes (process ``k`` takes every ``k``-th batch), call ``set_epoch(epoch_seed)`` before each epoch.

    Every epoch starts a fresh loader iterator, with or without workers: starting one draws the workers'
    base seed from the process's generator (which dropout draws from next), and a persistent-worker loader
    would draw it in its first epoch only, so the epochs after it would train with other dropout masks.
    ``pin_memory`` puts each batch in page-locked memory for a faster copy to a CUDA device.
    """
    return DataLoader(
        SeededItems(dataset),
        batch_size=per_device_batch_size,
        sampler=EpochSampler(len(dataset), global_batch_size),
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
