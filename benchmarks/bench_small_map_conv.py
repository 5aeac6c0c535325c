#!/usr/bin/env python
"""Speed of ``AtrousConv2d`` (``stpp_hf/models/deeplab/small_map_conv.py``) against the plain ``nn.Conv2d`` with the
same parameters, forward + backward on CPU, on the small maps of the method's small crops.

Each row is one 3x3 conv of the model at a given map size: a ResNet layer3 / layer4 conv (dilation 1, or 2 / 4 at
output stride 8) and the ASPP branches (dilation 6 to 18, where most taps read only padding). The ratio is the median
over rounds (alternating which side goes first) of (plain time / ours); the script checks both give the same output.

    python benchmarks/bench_small_map_conv.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_training import timed
from hardware import beside, print_hardware

from stpp_hf.models.deeplab.small_map_conv import AtrousConv2d

# (in channels, out channels, map side, dilation)
CASES = (
    (64, 64, 3, 1),
    (256, 256, 3, 1),
    (512, 512, 3, 1),
    (512, 512, 4, 2),
    (1024, 256, 4, 1),
    (2048, 256, 3, 6),
    (2048, 256, 4, 12),
    (512, 512, 8, 1),  # 64 positions: both sides run the same oneDNN convolution (the noise floor)
)


def forward_backward(conv, inputs):
    def step():
        conv.zero_grad(set_to_none=True)
        inputs.grad = None
        conv(inputs).sum().backward()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print_hardware("cpu")
    device = torch.device("cpu")
    print(
        beside(f"threads: {torch.get_num_threads()}, batch {args.batch_size}, {args.rounds} rounds of {args.repeats}")
    )
    print(beside("in -> out channels | map | dilation | plain ms | ours ms | plain / ours"))
    for in_channels, out_channels, side, dilation in CASES:
        torch.manual_seed(0)
        ours = AtrousConv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        plain = torch.nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        plain.load_state_dict(ours.state_dict())
        inputs = torch.randn(args.batch_size, in_channels, side, side, requires_grad=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(inputs), plain(inputs), rtol=1e-4, atol=1e-4)
        times = {"plain": [], "ours": []}
        variants = [("plain", plain), ("ours", ours)]
        for round_index in range(args.rounds):
            for name, conv in variants[:: 1 if round_index % 2 == 0 else -1]:  # alternate which goes first
                times[name].append(timed(forward_backward(conv, inputs), device, args.repeats))
        ratio = statistics.median(p / o for p, o in zip(times["plain"], times["ours"]))
        plain_ms, ours_ms = (statistics.median(times[name]) * 1e3 for name in ("plain", "ours"))
        print(
            beside(
                f"{in_channels} -> {out_channels} | {side}x{side} | {dilation} | {plain_ms:.2f} | {ours_ms:.2f} | "
                f"{ratio:.2f}x"
            )
        )


if __name__ == "__main__":
    main()
