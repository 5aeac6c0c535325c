"""Activation checkpointing per backbone block, through transformers' `activation_checkpointing_enable()`.

A checkpointed block keeps only its input for the backward pass and runs again there to rebuild what the
gradients need. Run naively, that second run also updates every BatchNorm's running mean, variance and
`num_batches_tracked` a second time. Here the second run (and any later one) updates throwaway copies of them:
they change once per forward, as without checkpointing, and the loss, gradients and buffers are bit for bit
those of the plain model.

Only relative imports inside this folder: it is copied verbatim as remote code next to saved models.
"""

import contextlib
from collections import OrderedDict
from collections.abc import Iterable

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


def make_stages_checkpointable(model: nn.Module, stage_names: Iterable[str]) -> None:
    """Turn each named child of `model` that is an `nn.Sequential` of blocks (a ResNet's `layer1` ...
    `layer4`) into a :class:`CheckpointedBlocks` holding the same blocks; other children are left as they are."""
    for name in stage_names:
        stage = getattr(model, name, None)
        if type(stage) is nn.Sequential:
            setattr(model, name, CheckpointedBlocks(OrderedDict(stage.named_children())))
