#!/usr/bin/env python
"""Speed at the method's recipe (docs/method.md §2, §4, §5) against a plain reference-style implementation,
in one process.

* training step of DeepLabV3+ ResNet-50 / ResNet-101, output stride 8, 321-px crops: the package's model and
  trainer step (fused SGD; bf16 = CPU/CUDA autocast, as ``--mixed_precision bf16`` does through Accelerate)
  vs a reference-style network (torchvision dilated ResNet + the spec's DeepLabV3+ head in plain ``nn.Conv2d``,
  official module names) trained by a plain loop (for-loop SGD, fp32);
* TTA pseudo-labeling of Pascal-sized images: ``label_images`` (BN folded, channels_last, the flip batched
  with the original, same-size images batched; bf16 under autocast) vs the reference network labeling one
  image and one flip at a time, fp32. Both networks hold the same weights (the package loads the reference's
  state dict with ``convert_original.load_original_state_dict``), so their labels are compared pixel by pixel.

Variants are timed in alternating rounds (median round), so a slow spell of a shared machine hits all alike.
GFLOP/s are the reference's FLOPs (``torch.utils.flop_counter``) over the time, against the fp32 and bf16
2048² matmul peaks measured in the same rounds.

    python benchmarks/bench_recipe.py                                  # both parts, ResNet-50 and -101
    python benchmarks/bench_recipe.py --part labeling --num_images 2 --image_size 375 500
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from bench_training import _Device, _MemoryStore, count_flops, matmul_peak_gflops, synchronize, timed
from hardware import beside, print_hardware
from torch import nn

from stpp_hf import build_model
from stpp_hf.convert_original import load_original_state_dict
from stpp_hf.models import IGNORE_INDEX
from stpp_hf.models.deeplab.deeplab_common import TTA_SCALES
from stpp_hf.training.pseudo_labeling import label_images
from stpp_hf.training.trainer import build_optimizer


def conv_bn_relu(in_channels, out_channels, kernel_size=1, dilation=1):
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ReferenceASPP(nn.Module):
    def __init__(self, in_channels, rates=(12, 24, 36)):
        super().__init__()
        out_channels = in_channels // 8
        self.b0 = conv_bn_relu(in_channels, out_channels)
        self.b1, self.b2, self.b3 = (conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates)
        self.b4 = nn.Module()
        self.b4.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels))
        self.project = nn.Sequential(*conv_bn_relu(5 * out_channels, out_channels), nn.Dropout2d(0.5))

    def forward(self, x):
        pooled = F.interpolate(self.b4.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), pooled], dim=1))


class ReferenceDeepLabV3Plus(nn.Module):
    """The reference's DeepLabV3+ (docs/method.md §4) with its module names: torchvision ResNet dilated to output
    stride 8."""

    def __init__(self, backbone: str, num_labels: int):
        super().__init__()
        self.backbone = getattr(torchvision.models, backbone)(
            weights=None, replace_stride_with_dilation=[False, True, True]
        )
        del self.backbone.avgpool, self.backbone.fc
        self.head = ReferenceASPP(2048)
        self.reduce = conv_bn_relu(256, 48)
        self.fuse = nn.Sequential(*conv_bn_relu(304, 256, 3), *conv_bn_relu(256, 256, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(256, num_labels, 1)

    def forward(self, x):
        b = self.backbone
        c1 = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        c4 = b.layer4(b.layer3(b.layer2(c1)))
        context = F.interpolate(self.head(c4), c1.shape[-2:], mode="bilinear", align_corners=True)
        logits = self.classifier(self.fuse(torch.cat([self.reduce(c1), context], dim=1)))
        return F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=True)


def networks(backbone, num_labels, calibration_images):
    """(reference network, package model) with the same weights: random init, BatchNorm at its initial statistics
    and the classifier scaled so that the class scores on ``calibration_images`` spread over a few units, as a
    trained model's do (not the thousands a random deep network gives)."""
    torch.manual_seed(0)
    reference = ReferenceDeepLabV3Plus(backbone, num_labels).eval()
    with torch.no_grad():
        scale = reference(calibration_images).std() / 3
        reference.classifier.weight /= scale
        reference.classifier.bias /= scale
    model = build_model("deeplabv3plus", num_labels=num_labels, backbone=backbone, output_stride=8)
    load_original_state_dict(model, reference.state_dict())
    return reference.eval(), model.eval()


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def alternate(functions: dict, rounds: int, repeats: int, device, warm_up: bool = True) -> tuple[dict, dict]:
    """Median seconds per call of each function over alternating rounds, and the fp32 / bf16 matmul peaks
    (GFLOP/s) measured in the same rounds: the load of a shared machine changes over minutes."""
    times = {name: [] for name in functions}
    peaks = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, function in functions.items():
            if warm_up:
                times[name].append(timed(function, device, repeats))
                continue
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[name].append(matmul_peak_gflops(device, dtype=dtype))
    median = statistics.median
    return {name: median(seconds) for name, seconds in times.items()}, {
        name: median(values) for name, values in peaks.items()
    }


def report(title, seconds, work, unit, flops, peaks):
    base = next(iter(seconds.values()))
    print(
        beside(
            f"\n== {title} ==\n2048² matmul in the same rounds: "
            f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s"
        )
    )
    width = max(len(name) for name in seconds)
    for name, elapsed in seconds.items():
        peak_name = "bf16" if "bf16" in name else "fp32"
        gflops = flops / elapsed / 1e9
        print(
            beside(
                f"{name:<{width}} {work / elapsed:7.3f} {unit}/s  {base / elapsed:5.2f}x baseline  "
                f"{gflops:6.1f} GFLOP/s ({100 * gflops / peaks[peak_name]:4.1f}% of the {peak_name} matmul peak)"
            )
        )


def benchmark_training(args, backbone, device):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, generator=generator).to(device)
    labels = torch.randint(0, args.num_labels, (args.batch_size, args.crop_size, args.crop_size), generator=generator)
    labels[:, : args.crop_size // 8] = IGNORE_INDEX  # some ignored pixels, like padding
    labels = labels.to(device)
    reference, model = networks(backbone, args.num_labels, images)
    reference, model = reference.to(device).train(), model.to(device).train()
    flops = count_flops(lambda: F.cross_entropy(reference(images), labels, ignore_index=IGNORE_INDEX).backward())

    def step_function(network, optimizer, dtype, loss_of):
        def step():
            with autocast(device, dtype):
                loss = loss_of(network)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    reference_loss = lambda network: F.cross_entropy(network(images), labels, ignore_index=IGNORE_INDEX)  # noqa: E731
    package_loss = lambda network: network(pixel_values=images, labels=labels).loss  # noqa: E731
    plain_sgd = torch.optim.SGD(reference.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=False)
    steps = {
        "baseline fp32 (reference net, for-loop SGD)": step_function(
            reference, plain_sgd, torch.float32, reference_loss
        )
    }
    variants = {
        "fp32": ("package fp32 (trainer step)", torch.float32),
        "bf16": ("package bf16 autocast", torch.bfloat16),
    }
    for name, dtype in (variants[variant] for variant in args.variants if variant in variants):
        network = copy.deepcopy(model)
        steps[name] = step_function(network, build_optimizer(network, 1e-3), dtype, package_loss)
    if "channels_last" in args.variants:
        last_images = images.contiguous(memory_format=torch.channels_last)
        last_loss = lambda network: network(pixel_values=last_images, labels=labels).loss  # noqa: E731
        compare_one_step(model, package_loss, last_loss)
        network = copy.deepcopy(model).to(memory_format=torch.channels_last)
        steps["package fp32 channels_last"] = step_function(
            network, build_optimizer(network, 1e-3), torch.float32, last_loss
        )
    seconds, peaks = alternate(steps, args.rounds, args.repeats, device)
    report(
        f"training step: DeepLabV3+ {backbone}, OS 8, {args.batch_size} x {args.crop_size} px",
        seconds,
        args.batch_size,
        "img",
        flops,
        peaks,
    )


def compare_one_step(model, loss_of, last_loss_of):
    """One fp32 training step from the same weights, contiguous vs channels_last: print how far the loss and the
    updated weights differ (0 would mean bit for bit), with dropout and without (dropout draws its mask in memory
    order, so the two layouts drop different pixels)."""
    for dropout in (True, False):
        print(f"dropout {'on ' if dropout else 'off'}: ", end="")
        _compare_one_step(model, loss_of, last_loss_of, dropout)


def _compare_one_step(model, loss_of, last_loss_of, dropout):
    results = []
    for memory_format, loss_function in ((torch.contiguous_format, loss_of), (torch.channels_last, last_loss_of)):
        network = copy.deepcopy(model).to(memory_format=memory_format)
        for module in network.modules():
            if isinstance(module, (nn.Dropout, nn.Dropout2d)) and not dropout:
                module.p = 0.0
        optimizer = build_optimizer(network, 1e-3)
        torch.manual_seed(3)  # the same dropout masks
        loss = loss_function(network)
        loss.backward()
        optimizer.step()
        results.append((loss.detach(), [parameter.detach().clone() for parameter in network.parameters()]))
    (loss, weights), (last_loss, last_weights) = results
    largest = max((a - b).abs().max().item() for a, b in zip(weights, last_weights))
    identical = all(torch.equal(a, b) for a, b in zip(weights, last_weights)) and torch.equal(loss, last_loss)
    print(
        beside(
            f"channels_last vs contiguous, one fp32 step: loss {loss.item():.8f} vs {last_loss.item():.8f}, "
            f"largest weight difference {largest:.3g}, bit for bit: {identical}"
        )
    )


def smooth_images(count, height, width, generator):
    """Pascal-sized stand-ins: smooth colour blobs plus a little texture, ImageNet-normalised range."""
    coarse = torch.randn(count, 3, height // 32 + 2, width // 32 + 2, generator=generator)
    images = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return images + 0.2 * torch.randn(count, 3, height, width, generator=generator)


@torch.no_grad()
def reference_tta_label(network, image):
    """Spec §5 for one image: every scale, the image and its flip one at a time, softmaxes summed in order."""
    height, width = image.shape[-2:]
    total = None
    for scale in TTA_SCALES:
        scaled = F.interpolate(
            image[None], size=(int(height * scale), int(width * scale)), mode="bilinear", align_corners=True
        )
        for flip in (False, True):
            logits = network(scaled.flip(3) if flip else scaled)
            probabilities = F.softmax(logits.flip(3) if flip else logits, dim=1)
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=True)
            total = probabilities if total is None else total + probabilities
    return total.argmax(1)[0]


class _AutocastDevice(_Device):
    def __init__(self, device, dtype):
        super().__init__(device)
        self.dtype = dtype

    def autocast(self):
        return autocast(self.device, self.dtype)


def benchmark_labeling(args, backbone, device):
    generator = torch.Generator().manual_seed(2)
    height, width = args.image_size
    images = smooth_images(args.num_images, height, width, generator)
    reference, model = networks(backbone, args.num_labels, images)
    reference, model = reference.to(device), model.to(device)
    dataset = [(image, None) for image in images]
    ids = [f"image_{index}" for index in range(len(dataset))]
    flops = count_flops(lambda: reference_tta_label(reference, images[0].to(device))) * len(dataset)
    outputs = {}

    def baseline():
        outputs["baseline"] = [reference_tta_label(reference, image.to(device)) for image, _ in dataset]

    def package(name, dtype):
        def run():
            store = _MemoryStore()
            label_images(
                model, dataset, ids, store, _AutocastDevice(device, dtype), batch_size=args.inference_batch_size
            )
            outputs[name] = [torch.as_tensor(store.labels[i]).to(device).long() for i in ids]

        return run

    functions = {"baseline fp32 (reference net, batch 1, one flip at a time)": baseline}
    for name, dtype in (("package fp32 (label_images)", torch.float32), ("package bf16 autocast", torch.bfloat16)):
        functions[name] = package(name, dtype)
    # no warm-up run: one labeling pass is long next to kernel selection
    seconds, peaks = alternate(functions, args.label_rounds, 1, device, warm_up=False)
    report(
        f"TTA labeling: DeepLabV3+ {backbone}, OS 8, {args.num_images} images of {height}x{width}",
        seconds,
        args.num_images,
        "img",
        flops,
        peaks,
    )
    for name in list(functions)[1:]:
        equal = sum((a == b).sum().item() for a, b in zip(outputs[name], outputs["baseline"]))
        print(
            beside(
                f"{name}: labels equal to the baseline's on "
                f"{100 * equal / (args.num_images * height * width):.3f}% of pixels"
            )
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    parser.add_argument("--label_backbones", nargs="+", default=["resnet50"])
    parser.add_argument("--num_labels", type=int, default=21)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--crop_size", type=int, default=321)
    parser.add_argument("--image_size", type=int, nargs=2, default=(375, 500), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--num_images", type=int, default=2)
    parser.add_argument("--inference_batch_size", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("fp32", "bf16", "channels_last"),
        default=["fp32", "bf16"],
        help="Package training steps timed against the baseline (channels_last: fp32 with the model and batch in "
        "channels_last memory format, checked against the contiguous step first).",
    )
    parser.add_argument("--repeats", type=int, default=1, help="Timed training steps per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating training rounds; the median counts.")
    parser.add_argument("--label_rounds", type=int, default=1, help="Alternating labeling rounds.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=("all", "training", "labeling"), default="all")
    args = parser.parse_args()
    device = torch.device(args.device)
    print_hardware(device)
    print(f"device {device}, threads {torch.get_num_threads()}")
    if args.part in ("all", "training"):
        for backbone in args.backbones:
            benchmark_training(args, backbone, device)
    if args.part in ("all", "labeling"):
        for backbone in args.label_backbones:
            benchmark_labeling(args, backbone, device)


if __name__ == "__main__":
    main()
