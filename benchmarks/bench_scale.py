#!/usr/bin/env python
"""Costs as the data grows: per-image time and peak memory of the data and store stages at several set sizes.

A Pascal-VOC-layout set of generated 500x375 / 375x500 JPEGs with palette masks is written once into a cache
directory; then, for each size N, a fresh process (so its peak RSS is its own) measures:

* ``load_source`` building and validating the Arrow table (every image and mask decoded once);
* ``PseudoLabelStore``: N ``put``s (PNG + journal line each), ``pending``, ``verify`` (checksums + manifest
  merge) and a reload (``get`` of every id from a new store object);
* TTA labeling of a fixed sample of images with a tiny model (ResNet-18, output stride 16, 64x86 px): the
  per-image overhead of ``label_images``, which must not depend on N (the network cost per image is fixed).

Per-image times that stay flat as N grows mean linear cost; the script prints the ratio of the largest N's
per-image time to the smallest N's. Each stage's CPU time (``time.process_time``) is printed next to its wall
time: on a shared machine the wall time also counts waiting for the cores, the CPU time does not.

    python benchmarks/bench_scale.py --sizes 250 500 1000 --cache_dir /tmp/stpp_scale
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from hardware import beside, print_hardware
from PIL import Image

from stpp_hf.data import PseudoLabelStore, load_source
from stpp_hf.data.splits import SplitEntry, write_split

SIZES = ((375, 500), (500, 375), (333, 500), (375, 500))  # (height, width), VOC-like mix


def generate(cache_dir: Path, count: int) -> Path:
    """``cache_dir`` holding ``count`` image / mask pairs (made once; later calls only add the missing ones)."""
    images, masks = cache_dir / "JPEGImages", cache_dir / "SegmentationClass"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = [value for index in range(256) for value in (index, 255 - index, (index * 7) % 256)]
    for index in range(count):
        stem = f"2026_{index:06d}"
        if (masks / f"{stem}.png").is_file():
            continue
        height, width = SIZES[index % len(SIZES)]
        coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(images / f"{stem}.jpg", quality=90)
        mask = Image.fromarray(rng.integers(0, 21, (height // 25 + 1, width // 25 + 1), dtype=np.uint8)).resize(
            (width, height), Image.NEAREST
        )
        mask.putpalette(palette)
        mask.save(masks / f"{stem}.png")
    return cache_dir


def measure(cache_dir: str, count: int, label_sample: int, queue) -> None:
    import torch

    from stpp_hf import build_model
    from stpp_hf.training.pseudo_labeling import label_images

    torch.set_num_threads(2)
    timings, cpu_timings = {}, {}

    @contextlib.contextmanager
    def stage(name):
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        timings[name], cpu_timings[name] = time.perf_counter() - start, time.process_time() - cpu_start

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        split = write_split(
            work / "split.txt",
            [SplitEntry(f"JPEGImages/2026_{i:06d}.jpg", f"SegmentationClass/2026_{i:06d}.png") for i in range(count)],
        )
        with stage("load_source"):
            source = load_source("pascal", cache_dir, split, require_masks=True, cache_dir=work / "arrow")
        ids = list(source["id"])
        label = np.zeros((375, 500), dtype=np.uint8)
        label[100:200, 100:300] = 7
        store = PseudoLabelStore(work / "store")
        with stage("store_put"):
            for image_id in ids:
                store.put(image_id, label)
        with stage("store_pending_verify"):
            assert store.pending(ids) == []
            store.verify(ids)
        with stage("store_reload_get"):
            reloaded = PseudoLabelStore(work / "store")
            for image_id in ids:
                reloaded.get(image_id)
        torch.manual_seed(0)
        model = build_model("deeplabv3plus", num_labels=21, backbone="resnet18", output_stride=16).eval()
        sample = [(torch.randn(3, 64, 86), None) for _ in range(label_sample)]
        with stage("tta_label_sample"):
            label_images(model, sample, ids[:label_sample], PseudoLabelStore(work / "tta"), batch_size=8)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"count": count, "seconds": timings, "cpu_seconds": cpu_timings, "peak_rss_mib": peak_mib})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "stpp_scale_cache"))
    parser.add_argument("--label_sample", type=int, default=16, help="Images TTA-labeled at every size.")
    parser.add_argument("--clear", action="store_true", help="Delete the generated set afterwards.")
    args = parser.parse_args()
    print_hardware("cpu")
    start = time.perf_counter()
    cache_dir = generate(Path(args.cache_dir), max(args.sizes))
    print(beside(f"generated set in {args.cache_dir} ({time.perf_counter() - start:.0f} s)"), flush=True)
    context = multiprocessing.get_context("spawn")
    results = []
    for count in sorted(args.sizes):
        queue = context.Queue()
        process = context.Process(target=measure, args=(str(cache_dir), count, args.label_sample, queue))
        process.start()
        results.append(queue.get())
        process.join()
        row = results[-1]
        per_image = {
            name: f"{1000 * seconds / images:.2f} (CPU {1000 * row['cpu_seconds'][name] / images:.2f})"
            for name, seconds in row["seconds"].items()
            for images in [args.label_sample if name == "tta_label_sample" else count]
        }
        print(
            beside(f"N={count:6d}  ms per image: {json.dumps(per_image)}  peak RSS {row['peak_rss_mib']:.0f} MiB"),
            flush=True,
        )
    first, last = results[0], results[-1]
    for name in first["seconds"]:
        scale = 1 if name == "tta_label_sample" else last["count"] / first["count"]
        ratios = [last[kind][name] / first[kind][name] / scale for kind in ("seconds", "cpu_seconds")]
        print(
            beside(
                f"{name}: per-image time at N={last['count']} / at N={first['count']}: "
                f"{ratios[0]:.2f} wall, {ratios[1]:.2f} CPU"
            )
        )
    if args.clear:
        shutil.rmtree(cache_dir)


if __name__ == "__main__":
    main()
