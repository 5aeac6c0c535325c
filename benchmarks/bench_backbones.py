#!/usr/bin/env python
"""Speed of DeepLabV3+ on other backbones against ResNet-101 DeepLabV3+ (the Pascal recipes' network), in one process.

For ResNet-101 and each backbone (default: those of examples/recipes/pascal-1464-{convnext_b,dinov2_s,dinov2_b}.yaml),
at the Pascal recipe's output stride and 21 classes, random init:

* training step: the trainer's step (fused SGD; bf16 = the loss under autocast, as ``--mixed_precision bf16``) on
  ``--batch_size`` crops of ``--crop_size`` px;
* TTA pseudo-labeling: ``label_images`` (BN folded, channels_last, the flip batched with the original, the 5 scales)
  of ``--num_images`` images of ``--image_size``;

each in fp32 and bf16 (autocast). Every variant runs once per round, the rounds alternate (median round), so a slow
spell of a shared machine hits all alike; each figure is printed as images/s and as a ratio to ResNet-101 at the same
precision, with the fp32 / bf16 2048² matmul GFLOP/s of the same rounds.

    python benchmarks/bench_backbones.py                                    # recipe sizes: 2 x 321 px, 375x500
    python benchmarks/bench_backbones.py --part labeling --image_size 188 250 --label_rounds 1
"""

from __future__ import annotations

import argparse

import torch
from bench_recipe import _AutocastDevice, alternate, autocast, smooth_images
from bench_training import _MemoryStore
from hardware import beside, print_hardware

from stpp_hf import build_model
from stpp_hf.training.pseudo_labeling import label_images
from stpp_hf.training.recipe import RECIPE_DEFAULTS
from stpp_hf.training.trainer import build_optimizer

BASELINE = "resnet101"
RECIPE_BACKBONES = ["convnext_base", "vit_small_patch14_dinov2", "vit_base_patch14_dinov2"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_LABELS = 21


def network(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    output_stride = RECIPE_DEFAULTS["pascal"].output_stride
    return build_model("deeplabv3plus", num_labels=NUM_LABELS, backbone=backbone, output_stride=output_stride)


def training_steps(args, backbones, device) -> dict:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, generator=generator).to(device)
    labels = torch.randint(0, NUM_LABELS, (args.batch_size, args.crop_size, args.crop_size), generator=generator)
    labels = labels.to(device)
    steps = {}
    for backbone in backbones:
        model = network(backbone).to(device).train()
        optimizer = build_optimizer(model, 1e-3)
        for precision, dtype in PRECISIONS.items():

            def step(model=model, optimizer=optimizer, dtype=dtype):
                with autocast(device, dtype):
                    loss = model(pixel_values=images, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            steps[(backbone, precision)] = step
    return steps


def labeling_runs(args, backbones, device) -> dict:
    height, width = args.image_size
    images = smooth_images(args.num_images, height, width, torch.Generator().manual_seed(2))
    dataset = [(image, None) for image in images]
    ids = [f"image_{index}" for index in range(len(dataset))]
    runs = {}
    for backbone in backbones:
        model = network(backbone).to(device).eval()
        for precision, dtype in PRECISIONS.items():

            def run(model=model, dtype=dtype):
                store = _MemoryStore()
                label_images(model, dataset, ids, store, _AutocastDevice(device, dtype), args.inference_batch_size)

            runs[(backbone, precision)] = run
    return runs


def report(title, seconds, work, peaks):
    print(
        beside(
            f"\n== {title} ==\n2048² matmul in the same rounds: "
            f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s"
        )
    )
    width = max(len(backbone) for backbone, _ in seconds)
    for (backbone, precision), elapsed in seconds.items():
        ratio = seconds[(BASELINE, precision)] / elapsed
        print(
            beside(
                f"{backbone:<{width}} {precision}  {elapsed:8.2f} s  {work / elapsed:7.3f} img/s  "
                f"{ratio:5.2f}x {BASELINE} {precision}  ({seconds[(backbone, 'fp32')] / elapsed:5.2f}x its fp32)"
            )
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=RECIPE_BACKBONES)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--crop_size", type=int, default=RECIPE_DEFAULTS["pascal"].crop_size)
    parser.add_argument("--image_size", type=int, nargs=2, default=(375, 500), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--inference_batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="Timed training steps per round (after a warm-up).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating training rounds; the median counts.")
    parser.add_argument("--label_rounds", type=int, default=1, help="Alternating labeling rounds (no warm-up).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=("all", "training", "labeling"), default="all")
    args = parser.parse_args()
    if args.batch_size < 2:
        parser.error(
            "--batch_size must be at least 2: the ASPP's image-pooling BatchNorm trains on one value per image"
        )
    device = torch.device(args.device)
    print_hardware(device)
    print(f"device {device}, threads {torch.get_num_threads()}", flush=True)
    backbones = [BASELINE, *(backbone for backbone in args.backbones if backbone != BASELINE)]
    output_stride = RECIPE_DEFAULTS["pascal"].output_stride
    if args.part in ("all", "training"):
        seconds, peaks = alternate(training_steps(args, backbones, device), args.rounds, args.repeats, device)
        title = f"training step: DeepLabV3+, OS {output_stride}, {args.batch_size} x {args.crop_size} px"
        report(title, seconds, args.batch_size, peaks)
    if args.part in ("all", "labeling"):
        runs = labeling_runs(args, backbones, device)
        seconds, peaks = alternate(runs, args.label_rounds, 1, device, warm_up=False)
        height, width = args.image_size
        title = f"TTA labeling: DeepLabV3+, OS {output_stride}, {args.num_images} images of {height}x{width}"
        report(title, seconds, args.num_images, peaks)


if __name__ == "__main__":
    main()
