#!/usr/bin/env python
"""Re-training loader throughput: stpp_hf's data path against a reference-style baseline, same run.

Ours: ``load_source`` (``datasets``) + ``RetrainDataset`` (dict membership, pseudo labels from a
``PseudoLabelStore``) + ``FastTrainTransform`` (what training runs), whose items are uint8
pixels and labels; the consuming process then makes model inputs of every timed batch on CPU
(``normalize_batch``, ``labels.long()``) on one intra-op thread (the workers hold the other cores),
as the trainer does on its device, so our side pays for the normalisation it moved out of the workers.
Baseline: what the reference code does per sample: a list of split lines, ``id in list`` tests to
decide labeled / pseudo-labeled, PIL ``Image.open`` of image and mask, PIL resize / ``ImageOps.expand``
/ crop / flip, torchvision v1 colour transforms, a float numpy cutout, v1 ``ToTensor`` + ``Normalize``
in the workers (float32 pixels, int64 labels).
Both read the same files through a ``DataLoader`` with the same workers and batch size; the membership
lists are as long as Pascal VOC's 1/16 split (662 labeled, 9919 unlabeled ids).

Also printed: each side's cost per sample in this process without a loader (ours: the item, then
its share of the batch normalisation), and the loader's own cost per sample for each side's item
format (a dataset returning ready tensors of the same shapes and dtypes); the throughput is roughly
one over their sum. The load average is printed because the numbers are only comparable on a quiet
machine.

    python benchmarks/bench_loader.py --num-workers 2 --rounds 9
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hardware import beside, print_hardware
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as v1

from stpp_hf.data import (
    FastTrainTransform,
    PseudoLabelStore,
    RetrainDataset,
    load_source,
    make_synthetic_dataset,
    normalize_batch,
    read_split,
)
from stpp_hf.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from stpp_hf.models import IGNORE_INDEX

PASCAL_1_16 = (662, 9919)  # labeled / unlabeled ids of pascal/1_16/split_0


class ReferenceStyleDataset(Dataset):
    """The reference's per-sample logic, written plainly (docs/method.md §3), as the baseline."""

    def __init__(self, root, labeled_lines, unlabeled_lines, pseudo_dir, base_size, crop_size, padding_ids):
        self.root, self.pseudo_dir = Path(root), Path(pseudo_dir)
        self.base_size, self.crop_size = base_size, crop_size
        # membership lists as long as a real split: the real lines plus ids that never match
        self.labeled_ids = padding_ids[0] + labeled_lines
        self.unlabeled_ids = padding_ids[1] + unlabeled_lines
        self.ids = labeled_lines * math.ceil(len(unlabeled_lines) / len(labeled_lines)) + unlabeled_lines
        self.normalize = v1.Compose([v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.color = v1.Compose(
            [v1.RandomApply([v1.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8), v1.RandomGrayscale(p=0.2)]
        )

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        line = self.ids[index]
        image_path, mask_path = line.split()
        image = Image.open(self.root / image_path).convert("RGB")
        if line in self.labeled_ids:
            mask = Image.open(self.root / mask_path)
        else:
            mask = Image.open(self.pseudo_dir / Path(mask_path).name)
        long_side = random.randint(int(self.base_size * 0.5), int(self.base_size * 2.0))
        width, height = image.size
        if height > width:
            size = (int(width * long_side / height + 0.5), long_side)
        else:
            size = (long_side, int(height * long_side / width + 0.5))
        image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        pad_w, pad_h = max(self.crop_size - size[0], 0), max(self.crop_size - size[1], 0)
        image = ImageOps.expand(image, border=(0, 0, pad_w, pad_h), fill=0)
        mask = ImageOps.expand(mask, border=(0, 0, pad_w, pad_h), fill=IGNORE_INDEX)
        left = random.randint(0, image.size[0] - self.crop_size)
        top = random.randint(0, image.size[1] - self.crop_size)
        box = (left, top, left + self.crop_size, top + self.crop_size)
        image, mask = image.crop(box), mask.crop(box)
        if random.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        if line in self.unlabeled_ids:
            image = self.color(image)
            if random.random() < 0.5:
                image = image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))
            image, mask = self._cutout(image, mask)
        return self.normalize(image), torch.from_numpy(np.array(mask)).long()

    @staticmethod
    def _cutout(image, mask):
        if random.random() >= 0.5:
            return image, mask
        pixels, labels = np.array(image), np.array(mask)
        height, width, channels = pixels.shape
        while True:
            area = np.random.uniform(0.02, 0.4) * height * width
            ratio = np.random.uniform(0.3, 1 / 0.3)
            box_w, box_h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
            x, y = np.random.randint(0, width), np.random.randint(0, height)
            if x + box_w <= width and y + box_h <= height:
                break
        pixels[y : y + box_h, x : x + box_w] = np.random.uniform(0, 255, (box_h, box_w, channels))
        labels[y : y + box_h, x : x + box_w] = IGNORE_INDEX
        return Image.fromarray(pixels.astype(np.uint8)), Image.fromarray(labels.astype(np.uint8))


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def model_inputs(images, labels):
    """What the trainer makes of a batch of our uint8 items: float32 normalised pixels, int64 labels."""
    return normalize_batch(images), labels.long()


def throughput(dataset, num_workers, batch_size, max_batches, consume=None):
    """``(images per wall second, images per CPU second)`` after the first batch (worker start-up
    excluded); ``consume(images, labels)`` runs on every timed batch in this process. CPU time sums
    this process and its workers (reaped when the loader shuts down), so it stays meaningful on a
    machine shared with other jobs, where wall time is not."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
    )
    iterator = iter(loader)
    next(iterator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # more threads than free cores only spin against the workers
    cpu_started, started, seen = _cpu_seconds(), time.perf_counter(), 0
    for batch_index, (images, labels) in enumerate(iterator):
        if consume is not None:
            consume(images, labels)
        seen += images.shape[0]
        if batch_index + 2 >= max_batches:
            break
    wall = time.perf_counter() - started
    torch.set_num_threads(threads)
    del iterator  # joins the workers, so their CPU time is counted
    return seen / wall, seen / (_cpu_seconds() - cpu_started)


class ReadyTensors(Dataset):
    """Items of the training shapes and the given dtypes made of nothing: what the loader itself
    (collate, shared memory, worker hand-off) costs per sample for that item format."""

    def __init__(self, length, crop_size, pixel_dtype, label_dtype):
        self.length, self.crop_size = length, crop_size
        self.pixel_dtype, self.label_dtype = pixel_dtype, label_dtype

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        size = self.crop_size
        return torch.zeros(3, size, size, dtype=self.pixel_dtype), torch.zeros(size, size, dtype=self.label_dtype)


def in_process_ms(dataset, num_samples):
    """Milliseconds of this process's CPU per sample, items fetched in a plain loop (no loader), on
    one intra-op thread as in a loader worker."""
    indices = torch.randperm(len(dataset))[:num_samples].tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.process_time()
    for index in indices:
        dataset[index]
    elapsed = time.process_time() - started
    torch.set_num_threads(threads)
    return 1000 * elapsed / len(indices)


def consume_ms(batch_size, crop_size, repeats=20):
    """Milliseconds of this process's CPU per sample for :func:`model_inputs` on one batch of our
    items, on one intra-op thread as in :func:`throughput`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = torch.randint(0, 256, (batch_size, 3, crop_size, crop_size), dtype=torch.uint8)
    labels = torch.randint(0, 256, (batch_size, crop_size, crop_size), dtype=torch.uint8)
    started = time.process_time()
    for _ in range(repeats):
        model_inputs(images, labels)
    elapsed = time.process_time() - started
    torch.set_num_threads(threads)
    return 1000 * elapsed / (repeats * batch_size)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build(workdir: Path, image_size: int, num_unlabeled: int, base_size: int, crop_size: int):
    synthetic = make_synthetic_dataset(
        workdir / "data", seed=0, num_labeled=20, num_unlabeled=num_unlabeled, num_val=1, image_size=image_size
    )
    labeled = load_source("pascal", synthetic.root, synthetic.split_files["labeled"], cache_dir=workdir / "cache")
    unlabeled = load_source("pascal", synthetic.root, synthetic.split_files["unlabeled"], cache_dir=workdir / "cache")
    # stand-in pseudo labels: the true masks, written by each side's own mechanism
    store, pseudo_dir = PseudoLabelStore(workdir / "store", palette=synthetic.palette), workdir / "pseudo_masks"
    pseudo_dir.mkdir(exist_ok=True)
    for entry in read_split(synthetic.split_files["unlabeled"]):
        mask = Image.open(synthetic.root / entry.mask)
        store.put(Path(entry.image).stem, np.asarray(mask))
        mask.save(pseudo_dir / Path(entry.mask).name)
    unlabeled_ids = list(unlabeled["id"])
    store.verify(unlabeled_ids)
    started = time.perf_counter()
    strong = FastTrainTransform(base_size, crop_size, strong=True)
    print(
        beside(
            f"ours, once per process and outside the timed rounds: the hue look-up tables (128 MB, shared with forked "
            f"workers) took {time.perf_counter() - started:.2f} s to build"
        )
    )
    ours = RetrainDataset(
        labeled, unlabeled, [(unlabeled_ids, store)], FastTrainTransform(base_size, crop_size), strong
    )
    lines = {part: synthetic.split_files[part].read_text().split("\n")[:-1] for part in ("labeled", "unlabeled")}
    padding = ([f"JPEGImages/pad{i}.jpg SegmentationClass/pad{i}.png" for i in range(n)] for n in PASCAL_1_16)
    baseline = ReferenceStyleDataset(
        synthetic.root, lines["labeled"], lines["unlabeled"], pseudo_dir, base_size, crop_size, tuple(padding)
    )
    assert len(ours) == len(baseline)
    return ours, baseline


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=400, help="Square synthetic images (Pascal-like ~400-500).")
    parser.add_argument("--base-size", type=int, default=400)
    parser.add_argument("--crop-size", type=int, default=321)
    parser.add_argument("--num-unlabeled", type=int, default=180)
    parser.add_argument("--max-batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=9, help="Alternating rounds; medians (and bests) are reported.")
    args = parser.parse_args()
    print_hardware("cpu")
    torch.manual_seed(0)
    random.seed(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        ours, baseline = build(Path(workdir), args.image_size, args.num_unlabeled, args.base_size, args.crop_size)
        # (name, dataset, what the consuming process does with each batch, item dtypes)
        sides = (
            ("stpp_hf", ours, model_inputs, (torch.uint8, torch.uint8)),
            ("baseline", baseline, None, (torch.float32, torch.int64)),
        )
        results = {name: [] for name, *_ in sides}
        for _ in range(args.rounds):  # alternate so background load hits both sides alike
            for name, dataset, consume, _ in sides:
                results[name].append(throughput(dataset, args.num_workers, args.batch_size, args.max_batches, consume))
        samples = args.batch_size * args.max_batches
        per_sample = {
            name: statistics.median(in_process_ms(dataset, samples) for _ in range(3)) for name, dataset, *_ in sides
        }
        normalise_ms = statistics.median(consume_ms(args.batch_size, args.crop_size) for _ in range(3))
        loader_ms = {
            name: 1000
            / throughput(
                ReadyTensors(len(ours), args.crop_size, *dtypes), args.num_workers, args.batch_size, args.max_batches
            )[1]
            for name, _, _, dtypes in sides
        }
    load_after = os.getloadavg()
    print(
        beside(
            f"re-training loader, {args.image_size}px images, crop {args.crop_size}, batch {args.batch_size}, "
            f"{args.num_workers} workers, {args.rounds} rounds; "
            f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
            f"({os.cpu_count()} CPUs)\n"
            f"  stpp_hf items are uint8, normalised per batch in this process (timed); "
            f"baseline items are normalised per sample by its dataset"
        )
    )
    median, best = {}, {}
    for name, values in results.items():
        median[name] = tuple(statistics.median(column) for column in zip(*values))
        best[name] = tuple(max(column) for column in zip(*values))
        rounds = ", ".join(f"{wall:.0f}" for wall, _ in values)
        print(
            beside(
                f"  {name:9s} median {median[name][0]:6.1f} images/s {median[name][1]:6.1f} images/CPU-s  "
                f"best {best[name][0]:6.1f} {best[name][1]:6.1f}   (wall rounds: {rounds})"
            )
        )
    for label, values in (("median", median), ("best", best)):
        print(
            beside(
                f"  speed-up ({label}) {values['stpp_hf'][0] / values['baseline'][0]:.2f}x wall, "
                f"{values['stpp_hf'][1] / values['baseline'][1]:.2f}x per CPU second"
            )
        )
    print(
        beside(
            f"  CPU ms per sample: stpp_hf {per_sample['stpp_hf']:.2f} + {normalise_ms:.2f} batch normalisation "
            "in the "
            f"consumer (uint8 items), baseline {per_sample['baseline']:.2f} (float32 items; one process, no loader); "
            f"the loader itself {loader_ms['stpp_hf']:.2f} for uint8 items, "
            f"{loader_ms['baseline']:.2f} for float32 / int64 ones"
        )
    )


if __name__ == "__main__":
    main()
