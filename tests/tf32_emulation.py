"""TF32 convolutions emulated on the CPU, for checks of code that must hold on CUDA's default precision.

On CUDA an fp32 convolution runs in TF32 while ``torch.backends.cudnn.conv.fp32_precision`` is ``"tf32"`` (the
default): its inputs and weights keep 10 of fp32's 23 mantissa bits, the products are summed in fp32.
:func:`emulated_tf32_convolutions` rounds the inputs and weights of every fp32 ``F.conv2d`` the same way while
that setting says so, which is what makes a CPU show the numbers a GPU would.
"""

import contextlib

import torch
import torch.nn.functional as F

TF32_DROPPED_BITS = 13  # fp32 mantissa 23 bits, TF32 10


def round_to_tf32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (float32) rounded to the nearest value with a 10-bit mantissa (ties away from zero); same
    memory layout."""
    bits = tensor.view(torch.int32)
    half, mask = 1 << (TF32_DROPPED_BITS - 1), ~((1 << TF32_DROPPED_BITS) - 1)
    return ((bits + half) & mask).view(torch.float32)


@contextlib.contextmanager
def emulated_tf32_convolutions():
    """Inside the block, fp32 ``F.conv2d`` calls outside autocast (``nn.Conv2d`` calls it) round their input and
    weight to TF32 while cuDNN's fp32 convolution precision is ``"tf32"``, as CUDA does. The rounding is
    straight-through for autograd (gradients pass it unchanged; the backward convolutions stay fp32), so training
    steps can run under it too."""
    original = F.conv2d

    def rounded(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.requires_grad:
            return round_to_tf32(tensor)
        return tensor + (round_to_tf32(tensor.detach()) - tensor).detach()  # exact: the difference is representable

    def conv2d(input, weight, *args, **kwargs):
        emulate = input.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(input.device.type)
        if emulate and torch.backends.cudnn.conv.fp32_precision == "tf32":
            input, weight = rounded(input), rounded(weight)
        return original(input, weight, *args, **kwargs)

    F.conv2d = conv2d
    try:
        yield
    finally:
        F.conv2d = original
