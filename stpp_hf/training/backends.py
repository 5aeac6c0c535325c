"""The CUDA backend settings the package changes, each for a block only and restored afterwards.

They change how fp32 kernels are picked on a GPU, never the method: on a CPU they have no effect.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls in full fp32 inside the block, not TF32 (CUDA runs fp32 convolutions in
    TF32 by default: ``torch.backends.cudnn.conv.fp32_precision == "tf32"``, inputs rounded to a 10-bit mantissa)."""
    settings = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    saved = [setting.fp32_precision for setting in settings]
    for setting in settings:
        setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        for setting, value in zip(settings, saved):
            setting.fp32_precision = value


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set to ``enabled`` inside the block: cuDNN times its algorithms once per
    input shape and keeps the fastest, which pays for the fixed-size training crops and not for images of many
    sizes (every new size would be timed again). Never on while deterministic algorithms are requested."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled and not torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
