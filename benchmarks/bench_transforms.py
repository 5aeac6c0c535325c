#!/usr/bin/env python
"""The fast paths of ``stpp_hf/data/fast_transforms.py`` against the plain steps of ``stpp_hf/data/transforms.py``
they replace, in the same process, on one thread: the hue step, the pixels-to-tensor step (with the copy that
collating makes of it), the scale + crop, and the whole training transform (weak and strong), at the Pascal
recipe's sizes (base 400, crop 321) on a 500 x 375 blurred noise image (neighbouring pixels share colours, as in
photos); the hue step also on plain noise, the worst case of its table look-ups. Each time is CPU time of this
process (steadier than wall time on a shared machine): the median over ``--rounds`` of the mean over ``--repeats``
calls with the same seeds on both sides, the two sides alternating round by round; also printed: the one-off
cost of building the hue tables.

    python benchmarks/bench_transforms.py --repeats 20 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from hardware import beside, print_hardware
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as F

from stpp_hf.data.fast_transforms import (
    FastTrainTransform,
    _hue_tables,
    adjust_hue,
    planar_pixels,
    random_scale_and_crop,
)
from stpp_hf.data.transforms import TrainTransform, pad_and_crop, random_scale

BASE_SIZE, CROP_SIZE = 400, 321


def seconds_per_call(functions, repeats: int, rounds: int) -> list[float]:
    """For each of ``functions``: the median over ``rounds`` of the mean CPU time of ``repeats`` calls, each
    after ``torch.manual_seed(call)``; the functions take turns within each round."""
    means = [[] for _ in functions]
    for _ in range(rounds):
        for function, times in zip(functions, means):
            start = time.process_time()
            for call in range(repeats):
                torch.manual_seed(call)
                function()
            times.append((time.process_time() - start) / repeats)
    return [statistics.median(times) for times in means]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print_hardware("cpu")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    image = noise.filter(ImageFilter.GaussianBlur(4))
    mask = Image.fromarray(rng.integers(0, 21, (375, 500), dtype=np.uint8), mode="L")
    crop, noise_crop = (picture.crop((0, 0, CROP_SIZE, CROP_SIZE)) for picture in (image, noise))

    _hue_tables.cache_clear()
    start = time.process_time()
    _hue_tables()
    print(beside(f"hue tables built once per process: {time.process_time() - start:.2f} CPU s"))

    cases = {
        "hue step": (lambda: F.adjust_hue(crop, 0.1), lambda: adjust_hue(crop, 0.1)),
        "hue step, plain noise": (lambda: F.adjust_hue(noise_crop, 0.1), lambda: adjust_hue(noise_crop, 0.1)),
        "pixels to a contiguous tensor": (
            lambda: F.pil_to_tensor(crop).contiguous(),
            lambda: planar_pixels(crop),
        ),
        "scale + crop": (
            lambda: pad_and_crop(*random_scale(image, mask, BASE_SIZE), CROP_SIZE),
            lambda: random_scale_and_crop(image, np.asarray(mask), BASE_SIZE, CROP_SIZE),
        ),
    }
    for strong in (False, True):
        plain, fast = TrainTransform(BASE_SIZE, CROP_SIZE, strong), FastTrainTransform(BASE_SIZE, CROP_SIZE, strong)
        cases[f"whole transform, {'strong' if strong else 'weak'}"] = (
            lambda plain=plain: plain(image, mask),
            lambda fast=fast: fast(image, mask),
        )
    print(beside(f"{'step (CPU ms per call)':34s} {'plain':>9s} {'fast':>9s} {'plain / fast':>12s}"))
    for name, steps in cases.items():
        plain_s, fast_s = seconds_per_call(steps, args.repeats, args.rounds)
        print(beside(f"{name:34s} {plain_s * 1e3:9.2f} {fast_s * 1e3:9.2f} {plain_s / fast_s:11.2f}x"))


if __name__ == "__main__":
    main()
