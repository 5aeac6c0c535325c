"""An optimisation, not part of the method: a "same"-padded stride-1 convolution for the small feature maps of small
crops, with the output and gradients of the plain (dilated) `nn.Conv2d` up to float rounding.

`tests/test_models.py` checks it against `nn.Conv2d`; `benchmarks/bench_small_map_conv.py` measures its speed.
"""

import torch
import torch.nn.functional as F
from torch import nn

# On CPU, maps with at most this many positions are convolved as one matmul over unfolded patches.
SMALL_MAP_POSITIONS = 16


class AtrousConv2d(nn.Conv2d):
    """A stride-1 conv with "same" padding (`padding = dilation * (kernel_size // 2)`, any dilation) with two
    shortcuts for small maps:

    - it leaves out the kernel rows / columns whose taps land on zero padding only, which happens when the dilation
      is at least the map's height or width (a 48-px crop at output stride 16 gives 3x3 maps under ASPP rates
      6 / 12 / 18, where each dilated 3x3 conv is in fact its centre 1x1 tap);
    - on CPU, a contiguous (NCHW) map of at most `SMALL_MAP_POSITIONS` positions is convolved as one matmul over its
      unfolded patches (oneDNN's conv kernels are tuned for large maps). Unfolding a channels_last map is slow, so
      those stay with oneDNN.

    Same parameters and state-dict keys as `nn.Conv2d`; the omitted terms are products with zeros.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.is_same_padded_stride_1(self):
            raise ValueError(
                f"AtrousConv2d needs stride 1, groups 1 and zero padding dilation * (kernel_size // 2); got stride "
                f"{self.stride}, groups {self.groups}, padding {self.padding} ({self.padding_mode}), "
                f"dilation {self.dilation}"
            )

    @staticmethod
    def is_same_padded_stride_1(conv: nn.Conv2d) -> bool:
        """Whether `conv` is a stride-1, ungrouped conv with zero "same" padding (what `AtrousConv2d` computes)."""
        same_padding = tuple(dilation * (size // 2) for size, dilation in zip(conv.kernel_size, conv.dilation))
        return (
            conv.stride == (1, 1)
            and conv.groups == 1
            and conv.padding == same_padding
            and conv.padding_mode == "zeros"
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "AtrousConv2d":
        """An `AtrousConv2d` holding `conv`'s own parameters (shared, not copied)."""
        atrous = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            device="meta",
        )
        atrous.weight, atrous.bias = conv.weight, conv.bias
        return atrous

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): the feature map.

        Returns:
            `torch.Tensor` of shape `(batch_size, out_channels, height, width)`.
        """
        height, width = input.shape[-2:]
        keep = [  # taps kept on each side of the centre
            min(size // 2, (extent - 1) // dilation)
            for size, extent, dilation in zip(self.kernel_size, (height, width), self.dilation)
        ]
        weight, padding = self.weight, self.padding
        if any(side < size // 2 for side, size in zip(keep, self.kernel_size)):
            (rows, columns), (center_row, center_column) = keep, (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
            weight = weight[
                :, :, center_row - rows : center_row + rows + 1, center_column - columns : center_column + columns + 1
            ]
            padding = (rows * self.dilation[0], columns * self.dilation[1])
        if input.device.type != "cpu" or height * width > SMALL_MAP_POSITIONS or not input.is_contiguous():
            return F.conv2d(input, weight, self.bias, self.stride, padding, self.dilation, self.groups)
        patches = F.unfold(input, weight.shape[-2:], dilation=self.dilation, padding=padding)  # [B, C*kh*kw, H*W]
        output = (weight.reshape(self.out_channels, -1) @ patches).view(
            input.shape[0], self.out_channels, height, width
        )
        if self.bias is None:
            return output
        return output + self.bias.to(output.dtype).view(1, -1, 1, 1)  # output is bf16 under CPU autocast


def with_atrous_convs(module: nn.Module) -> nn.Module:
    """Swap each plain stride-1, "same"-padded `nn.Conv2d` of `module` with a kernel larger than 1x1 (in a ResNet:
    every 3x3 conv but the stride-2 ones) for an `AtrousConv2d` holding the same parameters; returns `module`."""
    for name, conv in list(module.named_modules()):
        if type(conv) is nn.Conv2d and max(conv.kernel_size) > 1 and AtrousConv2d.is_same_padded_stride_1(conv):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, AtrousConv2d.from_conv(conv))
    return module


__all__ = ["SMALL_MAP_POSITIONS", "AtrousConv2d", "with_atrous_convs"]
