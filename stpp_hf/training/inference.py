"""Batched, sharded full-image inference shared by evaluation, selection and pseudo-labeling.

Each process takes a disjoint shard ``indices[rank::world_size]`` of the set (no padding, unlike a
prepared DataLoader), so results summed or gathered over processes equal a single-process pass.
Consecutive images of the same size are stacked into one batch; different sizes never are, so no
image is resized or padded and every prediction equals the one-image-at-a-time reference. The images are
decoded by DataLoader workers (``num_workers``) in the shard's order, so the batches do not depend on them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
import torch.nn.utils.fusion
from torch.utils.data import DataLoader

from .backends import ieee_fp32

PROBE_SIZE = 256


def shard_indices(num_items: int, process_index: int, num_processes: int) -> list[int]:
    """The indices of ``range(num_items)`` that process ``process_index`` handles."""
    return list(range(process_index, num_items, num_processes))


def shard_items(dataset: Sequence, indices: Sequence[int], num_workers: int = 0) -> Iterator[tuple[int, tuple]]:
    """Yield ``(index, dataset[index])`` for ``indices`` in that order, decoded by ``num_workers`` DataLoader
    workers (``0``: in this process). A dataset that can only be read once, in order (``read_once_in_order``,
    a streamed set), is read in this process."""
    workers = 0 if getattr(dataset, "read_once_in_order", False) else min(num_workers, len(indices))
    if workers == 0:
        for index in indices:
            yield index, dataset[index]
        return
    # batch_size=None: one item at a time, in the sampler's order whatever the number of workers
    loader = DataLoader(dataset, batch_size=None, sampler=list(indices), num_workers=workers, collate_fn=_item)
    yield from zip(indices, loader)


def _item(item):
    return item


def same_size_batches(
    dataset: Sequence, indices: Sequence[int], batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Yield ``(indices, images [B,3,H,W], masks [B,H,W] | None)`` from ``dataset[i] = (image, mask)``.

    A batch ends at ``batch_size`` items or when the next image has another size. Masks are ``None``
    for a batch where any mask is missing (unlabeled images). The images are decoded as :func:`shard_items`
    does (``num_workers``): the batches are the same for any number of workers. ``pin_memory`` puts each
    stacked batch of images in page-locked memory, for a faster copy to a CUDA device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    def flush():
        images = torch.stack([image for _, image, _ in pending])
        if pin_memory:
            images = images.pin_memory()
        masks = None if any(mask is None for _, _, mask in pending) else torch.stack([m for _, _, m in pending])
        return [index for index, _, _ in pending], images, masks

    for index, (image, mask) in shard_items(dataset, indices, num_workers):
        if pending and (len(pending) == batch_size or pending[0][1].shape != image.shape):
            yield flush()
            pending = []
        pending.append((index, image, mask))
    if pending:
        yield flush()


def pins_memory(device: torch.device) -> bool:
    """Whether loaders feeding ``device`` pin their batches (CUDA only: page-locked host memory copies faster)."""
    return device.type == "cuda"


def autocast(accelerator):
    """The accelerator's autocast context (its ``mixed_precision``), or a no-op without an accelerator."""
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


def inference_model(model: torch.nn.Module, device: torch.device, example: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` for repeated inference: eval mode, on ``device``, BN folded, channels_last.

    ``model`` itself is left as it was: converting a model that is being trained to channels_last
    would leave its parameters in another memory layout than the optimizer's momentum buffers.
    The folding is checked on a corner of ``example`` (one image, at most ``PROBE_SIZE`` pixels a
    side), so a full-size image never has to fit through the model in one piece.
    """
    probe = example[:1, :, :PROBE_SIZE, :PROBE_SIZE]
    return fold_batchnorm(model, to_device_images(probe, device)).to(memory_format=torch.channels_last)


# A folded conv computes its BatchNorm's function with other rounding: in fp32 the logits move by a few 1e-6 of their
# largest magnitude (1e-6 to 5e-6 measured on ResNet-18 / ResNet-50 at output stride 8 with spread BN statistics),
# while a conv output that also feeds another layer changes them by the BatchNorm's own scale and shift.
FOLD_RTOL = 1e-3
BATCHNORM_TYPES = (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)
# a subclass with its own forward (timm's BatchNormAct2d adds an activation) is more than a BatchNorm: not folded
PLAIN_BATCHNORM_FORWARDS = (torch.nn.BatchNorm2d.forward, torch.nn.SyncBatchNorm.forward)


@torch.no_grad()
def fold_batchnorm(model: torch.nn.Module, example: torch.Tensor, rtol: float = FOLD_RTOL) -> torch.nn.Module:
    """An eval-mode copy of ``model``, on ``example``'s device, with every BatchNorm2d or SyncBatchNorm that directly
    follows a Conv2d folded into the convolution's weights (one layer less per pair at inference, same function).

    Pairs are found by running ``example`` ``[B, 3, H, W]`` once and matching each BatchNorm's input
    tensor to the Conv2d that produced it; the folded copy is checked against the original on the same
    input and a ``RuntimeError`` is raised if their logits differ by more than ``rtol`` times the largest
    logit magnitude. Both probe passes run in full fp32 (not TF32, CUDA's default for convolutions, whose
    rounding alone would exceed any tolerance that still catches a wrong fold). In eval mode a SyncBatchNorm
    is the BatchNorm of its running statistics, so it folds the same way.
    """
    folded = copy.deepcopy(model).to(example.device).eval()
    # conv outputs are kept alive during the probe pass so their ids cannot be reused by other tensors
    conv_outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    modules = dict(folded.named_modules())

    def record_conv(name):
        return lambda module, args, output: conv_outputs.__setitem__(id(output), (name, output))

    def record_bn(name):
        def hook(module, args):
            producer = conv_outputs.get(id(args[0]))
            if producer is not None and producer[1] is args[0]:
                pairs[name] = producer[0]

        return hook

    hooks = []
    for name, module in modules.items():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(record_conv(name)))
        elif isinstance(module, BATCHNORM_TYPES) and type(module).forward in PLAIN_BATCHNORM_FORWARDS:
            hooks.append(module.register_forward_pre_hook(record_bn(name)))
    # The class's forward, not the instance attribute: a model prepared for mixed precision has its
    # forward wrapped in autocast, and the check must compare fp32 results.
    fp32_forward = type(folded).forward
    with ieee_fp32():
        reference = fp32_forward(folded, pixel_values=example).logits
        for hook in hooks:
            hook.remove()
        conv_outputs.clear()
        for bn_name, conv_name in pairs.items():
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(modules[conv_name], modules[bn_name])
            _set_submodule(folded, conv_name, fused)
            _set_submodule(folded, bn_name, torch.nn.Identity())
        difference = (fp32_forward(folded, pixel_values=example).logits - reference).abs().max().item()
    scale = reference.abs().max().item()
    if not difference <= rtol * scale:
        raise RuntimeError(
            f"BatchNorm folding changed the logits by {difference:.2e} (largest logit magnitude {scale:.2e}, "
            f"tolerance {rtol:g} of it): a folded conv output has other users"
        )
    return folded


def _set_submodule(root: torch.nn.Module, dotted_name: str, module: torch.nn.Module) -> None:
    parent_name, _, child_name = dotted_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child_name, module)


def to_device_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
