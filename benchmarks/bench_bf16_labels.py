#!/usr/bin/env python
"""bf16 vs fp32 pseudo labels of a trained teacher: TTA labels pixel by pixel, the fp32 margin where they differ,
and the reliable / unreliable split of ST++'s selection.

A random network's class scores are near ties almost everywhere, so its bf16 labels say little about a real
teacher's; this benchmark takes a finished run instead (e.g. the demo: ``examples/train_stpp.py`` on the built-in
synthetic data) and relabels that run's unlabeled images with the SupOnly teacher (``stages/1-suponly/best``)
through the package's path (``inference_model`` + ``predict_tta`` at ``TTA_SCALES``, the ``label_images`` path),
once in fp32 and once under bf16 autocast, then scores the selection with the SupOnly snapshots both ways
(``compute_reliability`` + ``split_by_reliability``). ``--image_size`` renders a fresh synthetic set at that size
instead (the same generator, so larger images hold larger objects than the teacher saw).

    python benchmarks/bench_bf16_labels.py --run_dir runs/demo
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_recipe import _AutocastDevice, autocast
from hardware import beside, print_hardware
from transformers import AutoModelForSemanticSegmentation

from stpp_hf.data import load_source
from stpp_hf.data.synthetic import make_synthetic_dataset
from stpp_hf.data.training_sets import EvalDataset
from stpp_hf.models.deeplab.deeplab_common import TTA_SCALES
from stpp_hf.training import compute_reliability, split_by_reliability
from stpp_hf.training.inference import inference_model, same_size_batches


def tta_scores(model, dataset, dtype, batch_size):
    """Summed TTA softmax ``[C, H, W]`` (float32) of every image, the network under ``dtype`` autocast."""
    device = torch.device("cpu")
    folded, scores = None, {}
    for indices, images, _ in same_size_batches(dataset, list(range(len(dataset))), batch_size):
        if folded is None:
            folded = inference_model(model, device, images[:1])
        with torch.no_grad(), autocast(device, dtype):
            summed = folded.predict_tta(images, scales=TTA_SCALES, flip=True).float()
        scores.update(zip(indices, summed))
    return [scores[index] for index in range(len(dataset))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="A finished run on the built-in synthetic data.")
    parser.add_argument("--num_images", type=int, default=None, help="Label the first N unlabeled images only.")
    parser.add_argument("--image_size", type=int, default=None, help="Render a fresh synthetic set at this size.")
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    print_hardware("cpu")
    run_dir = Path(args.run_dir)
    teacher_dir = run_dir / "stages" / "1-suponly" / "best"
    teacher = AutoModelForSemanticSegmentation.from_pretrained(teacher_dir)
    with tempfile.TemporaryDirectory() as work:
        if args.image_size:
            data = make_synthetic_dataset(
                Path(work) / "data", seed=1, image_size=args.image_size, num_unlabeled=args.num_images or 300
            )
            root, split = data.root, data.split_files["unlabeled"]
        else:
            root = run_dir / "synthetic_data"
            split = root / "splits" / "unlabeled.txt"
        source = load_source("pascal", root, split, cache_dir=Path(work) / "cache")
        if args.num_images:
            source = source.select(range(min(args.num_images, len(source))))
        dataset = EvalDataset(source)
        ids = dataset.ids
        num_classes = teacher.config.num_labels
        print(beside(f"teacher {teacher_dir}, {len(dataset)} images of {tuple(dataset[0][0].shape[-2:])} px"))

        fp32, bf16 = (
            tta_scores(teacher, dataset, dtype, args.batch_size) for dtype in (torch.float32, torch.bfloat16)
        )
        total = sum(scores[0].numel() for scores in fp32)  # H * W of each image
        equal = sum((a.argmax(0) == b.argmax(0)).sum().item() for a, b in zip(fp32, bf16))
        print(beside(f"TTA labels: bf16 equal to fp32 on {100 * equal / total:.3f}% of {total} pixels"))
        # the fp32 margin (top-1 minus top-2 of the mean softmax over the 10 TTA passes) where bf16 differs, vs all
        passes = 2 * len(TTA_SCALES)
        margins, differing = [], []
        for a, b in zip(fp32, bf16):
            top2 = (a / passes).topk(2, dim=0).values
            margin = (top2[0] - top2[1]).flatten()
            margins.append(margin)
            differing.append(margin[(a.argmax(0) != b.argmax(0)).flatten()])
        margins, differing = torch.cat(margins), torch.cat(differing)
        quantiles = torch.tensor([0.5, 0.9, 0.99, 1.0])
        for name, values in (("all pixels", margins), ("differing pixels", differing)):
            if values.numel():
                listed = ", ".join(f"q{q:.2f} {v:.4f}" for q, v in zip(quantiles, values.quantile(quantiles)))
                print(beside(f"fp32 margin at {name} ({values.numel()}): {listed}"))
        for threshold in (0.01, 0.05):
            print(beside(f"pixels with fp32 margin < {threshold}: {100 * (margins < threshold).float().mean():.3f}%"))

        snapshot_dirs = (run_dir / "stages" / "1-suponly" / "snapshots").glob("epoch_*")
        snapshots = [
            AutoModelForSemanticSegmentation.from_pretrained(path)
            for path in sorted(snapshot_dirs, key=lambda path: int(path.name.split("_")[1]))
        ]
        splits, scores = {}, {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            device = _AutocastDevice(torch.device("cpu"), dtype)
            scores[name] = compute_reliability(snapshots, dataset, ids, num_classes, device, args.batch_size)
            splits[name] = split_by_reliability(scores[name], ids)
        moved = len(set(splits["fp32"][0]) - set(splits["bf16"][0]))
        largest = max(abs(scores["fp32"][i] - scores["bf16"][i]) for i in ids)
        print(
            beside(
                f"selection with {len(snapshots)} snapshots: {moved} of {len(splits['fp32'][0])} reliable ids differ "
                f"between fp32 and bf16; largest reliability difference {largest:.4f}"
            )
        )


if __name__ == "__main__":
    main()
