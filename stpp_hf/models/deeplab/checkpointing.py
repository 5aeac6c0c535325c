"""Activation checkpointing per backbone block, through transformers' `activation_checkpointing_enable()`.

Multi-scale backbones (ResNet, ConvNeXt, EfficientNet, ...) have their stages turned into `CheckpointedBlocks`;
ViTs use timm's own per-block checkpointing (`ResampledFeatureGetter.gradient_checkpointing`, timm_backbones.py).
A checkpointed block keeps only its input for the backward pass and runs again there to rebuild what the
gradients need. Run naively, that second run also updates every BatchNorm's running mean, variance and
`num_batches_tracked` a second time. Here the second run (and any later one) updates throwaway copies of them:
they change once per forward, as without checkpointing, and the loss, gradients and buffers are bit for bit
those of the plain model.

Only relative imports inside this folder: it is copied verbatim as remote code next to saved models.
"""

import contextlib
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def running_statistics_kept(module: nn.Module):
    """Within it, every BatchNorm of `module` updates throwaway copies of its buffers (running mean, variance,
    `num_batches_tracked`); on exit the untouched originals are back in place.

    The forward runs as it did the first time (the same kernels, the same tensors saved for backward), and no
    buffer the model holds is written (writing one in place would also bump a version counter that autograd
    checks).
    """
    originals = [
        (norm, dict(norm.named_buffers(recurse=False)))
        for norm in module.modules()
        if isinstance(norm, _BatchNorm) and norm.track_running_stats
    ]
    for norm, buffers in originals:
        for name, buffer in buffers.items():
            setattr(norm, name, buffer.clone())
    try:
        yield
    finally:
        for norm, buffers in originals:
            for name, buffer in buffers.items():
                setattr(norm, name, buffer)


class _StatisticsOnFirstCall:
    """`block` as a function whose first call is the ordinary forward and whose later calls (the recompute
    in backward) leave the running statistics as the first call left them."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1:
            return self.block(*args)
        with running_statistics_kept(self.block):
            return self.block(*args)


class CheckpointedBlocks(nn.Sequential):
    """A stage of blocks (an `nn.Sequential`, same children and state-dict keys) that checkpoints each block
    when `gradient_checkpointing` is on and gradients are recorded in training mode.

    `gradient_checkpointing` and `_gradient_checkpointing_func` are set by the model's
    `activation_checkpointing_enable()` / `gradient_checkpointing_enable()` and `..._disable()`.
    """

    gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self:
            if checkpointing:
                hidden_states = self._gradient_checkpointing_func(_StatisticsOnFirstCall(block), hidden_states)
            else:
                hidden_states = block(hidden_states)
        return hidden_states


def _is_block(module: nn.Module) -> bool:
    # a block is built of layers (a ResNet bottleneck, a ConvNeXt or MBConv block), not a single layer
    return not isinstance(module, nn.Sequential) and next(module.children(), None) is not None


def make_blocks_checkpointable(backbone: nn.Module) -> int:
    """Turn every stage of `backbone` into a :class:`CheckpointedBlocks` holding the same blocks; returns how many.

    A stage is an `nn.Sequential` of blocks that its parent runs as a whole: a ResNet's `layer1` ... `layer4`, a
    ConvNeXt stage's `blocks`, each stage of EfficientNet's `blocks` (the `nn.Sequential` of stages around them is
    run stage by stage, so it is not one). Backbones whose blocks sit elsewhere (RegNet's stages are not
    `nn.Sequential`) get none, and so does one with a switch of its own (a ViT: timm's per-block checkpointing).
    """
    if hasattr(backbone, "gradient_checkpointing"):
        return 0
    stages = []
    for name, module in backbone.named_modules():
        inside = any(name.startswith(f"{stage}.") for stage, _ in stages)
        children = list(module.children())
        if not inside and type(module) is nn.Sequential and children and all(map(_is_block, children)):
            stages.append((name, module))
    for name, stage in stages:
        parent_name, _, child_name = name.rpartition(".")
        setattr(
            backbone.get_submodule(parent_name), child_name, CheckpointedBlocks(OrderedDict(stage.named_children()))
        )
    return len(stages)
