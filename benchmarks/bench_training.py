#!/usr/bin/env python
"""Speed of the trainer's hot loops against naive baselines measured in the same process.

* training step (images/s, median of alternating rounds): the trainer's step (fused SGD; optionally
  channels_last) vs the same model and recipe run naively (fp32, contiguous NCHW, for-loop SGD);
* selection + pseudo-labeling (images/s): ``compute_reliability`` + ``label_images`` (batched
  same-size images, all snapshots per batch, BN folded, channels_last) vs a batch-1 loop that runs
  one model at a time over all images;
* achieved GFLOP/s (``torch.utils.flop_counter``) against this machine's measured fp32 matmul peak.
  Every row is credited with the naive baseline's FLOPs (the method's work), so skipped work shows
  up as speed, not as lower efficiency.

Both sides compute the same method; the script checks that their outputs agree.

    python benchmarks/bench_training.py                       # default synthetic-run model, CPU
    python benchmarks/bench_training.py --backbone resnet50 --crop_size 321 --batch_size 16 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from hardware import beside, print_hardware
from torch.utils.flop_counter import FlopCounterMode

from stpp_hf import build_model
from stpp_hf.models.deeplab.deeplab_common import TTA_SCALES
from stpp_hf.training.pseudo_labeling import label_images
from stpp_hf.training.selection import compute_reliability
from stpp_hf.training.trainer import build_optimizer


class _MemoryStore:
    """In-memory stand-in for the pseudo-label store so disk I/O is not timed."""

    def __init__(self):
        self.labels = {}

    def pending(self, ids):
        return [i for i in ids if i not in self.labels]

    def put(self, image_id, label_map):
        self.labels[image_id] = label_map


class _Device:
    def __init__(self, device):
        self.device, self.process_index, self.num_processes = device, 0, 1

    def autocast(self):
        return contextlib.nullcontext()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device, repeats):
    function()  # warm-up (allocations, kernel selection)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak_gflops(device, size=2048, repeats=10, dtype=torch.float32):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats)
    return 2 * size**3 / seconds / 1e9


def count_flops(function):
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


def benchmark_training(args, device, peak):
    torch.manual_seed(0)
    base = build_model(
        "deeplabv3plus", num_labels=args.num_labels, backbone=args.backbone, output_stride=args.output_stride
    )
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    labels = torch.randint(0, args.num_labels, (args.batch_size, args.crop_size, args.crop_size), device=device)
    results = {}
    variants = (
        ("naive fp32 NCHW, for-loop SGD", False, False),
        ("fused SGD (trainer, CPU)", False, True),
        ("... + channels_last (trainer, CUDA)", True, True),
    )
    flops, steps = None, {}
    for name, channels_last, fused in variants:
        model = copy.deepcopy(base).to(device)
        inputs = images
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            logits = model.eval()(pixel_values=inputs).logits
        if flops is None:
            flops, reference_logits = (
                count_flops(lambda: model.train()(pixel_values=inputs, labels=labels).loss.backward()),
                logits,
            )
        difference = (logits - reference_logits).abs().max().item()
        model.train().zero_grad(set_to_none=True)
        optimizer = build_optimizer(model, 1e-3, fused=fused)

        def step(model=model, inputs=inputs, optimizer=optimizer):
            loss = model(pixel_values=inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[f"{name} [max |logit - naive| {difference:.1e}]"] = step
    # alternating rounds, medians: a slow spell of a shared machine hits every variant alike
    rounds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rounds[name].append(timed(step, device, args.repeats))
    results = {}
    for name, seconds in rounds.items():
        seconds = statistics.median(seconds)
        results[name] = (args.batch_size / seconds, flops / seconds / 1e9)
    _print("training step", results, peak)


def benchmark_inference(args, device, peak):
    generator = torch.Generator().manual_seed(0)
    dataset = [
        (torch.randn(3, args.image_size, args.image_size, generator=generator), None) for _ in range(args.num_images)
    ]
    ids = [f"u{index}" for index in range(args.num_images)]
    snapshots = []
    for seed in range(3):
        torch.manual_seed(seed)
        snapshots.append(
            build_model(
                "deeplabv3plus", num_labels=args.num_labels, backbone=args.backbone, output_stride=args.output_stride
            )
            .eval()
            .to(device)
        )
    teacher = snapshots[-1]

    @torch.no_grad()
    def baseline():
        predictions = [
            [m(pixel_values=image[None].to(device)).logits.argmax(1) for image, _ in dataset] for m in snapshots
        ]
        labels = []
        for image, _ in dataset:
            image = image[None].to(device)
            height, width = image.shape[-2:]
            total = 0
            for scale in TTA_SCALES:
                scaled = F.interpolate(
                    image, size=(int(height * scale), int(width * scale)), mode="bilinear", align_corners=True
                )
                for flip in (False, True):
                    logits = teacher(pixel_values=scaled.flip(-1) if flip else scaled).logits
                    probabilities = F.softmax(logits.flip(-1) if flip else logits, dim=1)
                    total = total + F.interpolate(
                        probabilities, size=(height, width), mode="bilinear", align_corners=True
                    )
            labels.append(total.argmax(1))
        return predictions, labels

    store = _MemoryStore()

    def ours():
        store.labels.clear()
        compute_reliability(
            snapshots, dataset, ids, args.num_labels, _Device(device), batch_size=args.inference_batch_size
        )
        label_images(teacher, dataset, ids, store, _Device(device), batch_size=args.inference_batch_size)

    baseline_seconds = timed(baseline, device, 1)
    ours_seconds = timed(ours, device, 1)
    _, reference_labels = baseline()
    agreement = sum(
        (torch.as_tensor(store.labels[i]).to(device).long() == label[0]).float().mean().item()
        for i, label in zip(ids, reference_labels)
    ) / len(ids)
    flops = count_flops(baseline)
    results = {
        "baseline (batch 1, one model at a time)": (
            args.num_images / baseline_seconds,
            flops / baseline_seconds / 1e9,
        ),
        "selection + labeling (batched, folded BN, channels_last)": (
            args.num_images / ours_seconds,
            flops / ours_seconds / 1e9,
        ),
    }
    _print("selection + pseudo-labeling", results, peak)
    print(beside(f"pseudo-label pixel agreement with the baseline: {100 * agreement:.3f}%"))


def _print(title, results, peak):
    (base_name, (base_speed, _)), *_ = results.items()
    print(f"\n== {title} ==")
    width = max(len(name) for name in results)
    for name, (speed, gflops) in results.items():
        print(
            beside(
                f"{name:<{width}} {speed:8.2f} img/s  {speed / base_speed:5.2f}x  "
                f"{gflops:7.1f} GFLOP/s ({100 * gflops / peak:4.1f}% of peak)"
            )
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output_stride", type=int, default=16)
    parser.add_argument("--num_labels", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_size", type=int, default=48)
    parser.add_argument("--image_size", type=int, default=48)
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--inference_batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per round (training) or runs (inference).")
    parser.add_argument(
        "--rounds", type=int, default=5, help="Alternating training-step rounds; the median round counts."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=("all", "training", "inference"), default="all")
    args = parser.parse_args()
    device = torch.device(args.device)
    print_hardware(device)
    peak = matmul_peak_gflops(device)
    print(beside(f"device {device}, threads {torch.get_num_threads()}, measured fp32 matmul peak {peak:.1f} GFLOP/s"))
    if args.part in ("all", "training"):
        benchmark_training(args, device, peak)
    if args.part in ("all", "inference"):
        benchmark_inference(args, device, peak)


if __name__ == "__main__":
    main()
