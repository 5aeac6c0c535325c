#!/usr/bin/env python
"""How far BatchNorm folding moves the logits, against the fold check's tolerance (``FOLD_RTOL`` of the largest
logit magnitude, ``stpp_hf/training/inference.py``): a DeepLabV3+ with spread, trained-looking BatchNorm statistics
(random weights otherwise), in fp32 and with TF32 convolutions emulated (inputs and weights rounded to a 10-bit
mantissa, ``tests/tf32_emulation.py``). Not a speed benchmark: it prints the margin of the check.

    python benchmarks/fold_check_margin.py --backbone resnet50 --size 65
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import trained_looking_batchnorm  # noqa: E402
from tf32_emulation import emulated_tf32_convolutions  # noqa: E402

from stpp_hf import build_model  # noqa: E402
from stpp_hf.training.inference import FOLD_RTOL, fold_batchnorm, to_device_images  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output_stride", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model("deeplabv3plus", backbone=args.backbone, output_stride=args.output_stride, num_labels=21)
    trained_looking_batchnorm(model, generator=generator)
    image = to_device_images(torch.randn(1, 3, args.size, args.size, generator=generator), torch.device("cpu"))
    folded = fold_batchnorm(model, image)  # checked in full fp32
    for name, precision in (("fp32", contextlib.nullcontext), ("TF32 (emulated)", emulated_tf32_convolutions)):
        with precision():
            reference = model(pixel_values=image).logits
            difference = (folded(pixel_values=image).logits - reference).abs().max().item()
        scale = reference.abs().max().item()
        print(
            f"{args.backbone} OS{args.output_stride} {args.size}px, {name}: folded vs unfolded logits differ by "
            f"{difference:.2e} = {difference / scale:.1e} of the largest logit ({scale:.3g}); "
            f"the check allows {FOLD_RTOL:g} of it and runs in fp32"
        )


if __name__ == "__main__":
    main()
