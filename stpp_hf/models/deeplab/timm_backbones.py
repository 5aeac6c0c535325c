"""Any timm backbone that yields feature maps, as the DeepLab heads take them: [low level, high level].

The low level is the backbone's stride-4 feature map (or the one nearest stride 4); the high level is its deepest
map at the model's output stride. Multi-scale backbones (ResNet, ConvNeXt, EfficientNet, RegNet, ...) reach the
output stride through timm's dilation (`output_stride`). Single-scale backbones (ViTs: every block at the patch
stride) give the tokens of two blocks as maps (timm's `forward_intermediates`), resampled to stride 4 and to the
output stride (docs/method.md, "Other backbones").

`backbone_layout` describes a backbone without building its weights (on the meta device, cached);
`create_backbone` builds it. Only relative imports: this file is remote code next to saved models.
"""

import functools
import json
import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet
from torch import nn
from torch.utils.checkpoint import checkpoint

LOW_LEVEL_STRIDE = 4
EXAMPLE_BACKBONES = "resnet50, convnext_base, efficientnet_b3, regnety_040, vit_base_patch14_dinov2"
EXAMPLE_CHECKPOINTING_BACKBONES = "resnet50, convnext_base, efficientnet_b3, vit_base_patch14_dinov2"


@dataclass(frozen=True)
class BackboneLayout:
    """What the heads need to know of a backbone.

    Attributes:
        out_indices (`tuple[int, int]`): timm feature indices of [low level, high level] (block indices for a
            single-scale backbone).
        channels (`tuple[int, int]`): their channel counts, from timm's `feature_info`.
        single_scale (`bool`): a ViT-style backbone whose maps are resampled to the strides the heads need.
    """

    out_indices: tuple[int, int]
    channels: tuple[int, int]
    single_scale: bool


def _option_error(field: str, value, reason: str) -> ValueError:
    return ValueError(f"{field}={value!r}: {reason}")


def _create_features(name: str, kwargs: dict, **feature_kwargs) -> nn.Module:
    """timm's feature extractor of `name` (random init); a `ValueError` naming `backbone` when it has none."""
    if not timm.is_model(name):
        raise _option_error("backbone", name, f"not a timm architecture; e.g. {EXAMPLE_BACKBONES}")
    try:
        return timm.create_model(name, pretrained=False, features_only=True, **feature_kwargs, **kwargs)
    except TypeError:
        raise
    except Exception as error:
        raise _option_error(
            "backbone",
            name,
            f"timm gives no feature maps for it ({error}); use one that does, e.g. {EXAMPLE_BACKBONES}",
        ) from error


def _single_scale_kwargs(kwargs: dict) -> dict:
    # any input size: the position embedding is interpolated, inputs padded to whole patches
    return {"dynamic_img_size": True, "dynamic_img_pad": True, **kwargs}


def _nearest_level(reductions: list[int], target: int) -> int:
    """Index of the stride nearest `target` on a log scale (the deeper level on a tie)."""
    distances = [abs(math.log2(reduction / target)) for reduction in reductions]
    return max(range(len(reductions)), key=lambda index: (-distances[index], index))


@functools.lru_cache(maxsize=32)
def _cached_layout(name: str, output_stride: int, out_indices: tuple | None, kwargs_json: str) -> BackboneLayout:
    kwargs = json.loads(kwargs_json)
    with torch.device("meta"):
        try:
            native = _create_features(name, kwargs)
        except TypeError as error:
            raise _option_error("backbone_kwargs", kwargs, f"not arguments of timm's {name}: {error}") from error
        reductions = native.feature_info.reduction()
        single_scale = len(set(reductions)) == 1
        if single_scale:
            depth = len(native.feature_info.info)
            indices = out_indices or (max(depth // 4 - 1, 0), depth - 1)
            backbone = create_single_scale_backbone(name, indices, output_stride, kwargs)
            return BackboneLayout(tuple(indices), tuple(backbone.feature_info.channels()), True)
        try:
            dilated = _create_features(name, kwargs, output_stride=output_stride)
        except TypeError as error:
            raise _option_error(
                "output_stride",
                output_stride,
                f"timm cannot dilate {name} ({error}); its strides are {reductions}. Use a backbone timm can dilate, "
                f"e.g. {EXAMPLE_BACKBONES}",
            ) from error
    reductions = dilated.feature_info.reduction()
    if reductions[-1] != output_stride:
        raise _option_error(
            "output_stride",
            output_stride,
            f"{name} reaches stride {reductions[-1]} at its deepest level with timm's output_stride={output_stride} "
            f"(strides {reductions}); use a backbone timm can dilate, e.g. {EXAMPLE_BACKBONES}",
        )
    if out_indices is None:
        out_indices = (_nearest_level(reductions[:-1], LOW_LEVEL_STRIDE), len(reductions) - 1)
    if len(out_indices) != 2 or not all(0 <= index < len(reductions) for index in out_indices):
        raise _option_error(
            "backbone_out_indices", list(out_indices), f"give two of {name}'s feature levels 0..{len(reductions) - 1}"
        )
    channels = dilated.feature_info.channels()
    return BackboneLayout(tuple(out_indices), (channels[out_indices[0]], channels[out_indices[1]]), False)


def backbone_layout(
    name: str, output_stride: int, out_indices: list[int] | None = None, kwargs: dict | None = None
) -> BackboneLayout:
    """The layout of the timm backbone `name` at `output_stride`; a `ValueError` naming the option that cannot work.

    Args:
        name (`str`): timm architecture ("resnet50", "convnext_base", "vit_small_patch14_dinov2", ...).
        output_stride (`int`): stride of the high-level map (8 or 16).
        out_indices (`list[int]`, *optional*): timm feature levels (blocks for a ViT) of [low, high]; None = the
            level nearest stride 4 and the deepest (a ViT: the block at a quarter of its depth and the last).
        kwargs (`dict`, *optional*): further `timm.create_model` arguments (e.g. `{"img_size": 224}`).
    """
    return _cached_layout(name, output_stride, tuple(out_indices) if out_indices else None, json.dumps(kwargs or {}))


class ResampledFeatureGetter(FeatureGetterNet):
    """A single-scale timm model's intermediate tokens as [low level, high level] maps at the strides the heads need.

    The tokens of the two blocks (after the model's final norm) come as maps at the patch stride, through
    `forward_intermediates`; each is resized bilinearly (align_corners=False: patch centres onto pixel centres) to
    ceil(size / stride), the size a dilated CNN gives.
    """

    def __init__(self, model: nn.Module, out_indices: tuple[int, int], strides: tuple[int, int]):
        super().__init__(model, out_indices=list(out_indices), norm=True)
        self.strides = strides

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`).

        Returns:
            `list[torch.Tensor]`: maps of shape `(batch_size, channels, ceil(height / stride), ceil(width / stride))`,
            stride 4 then the output stride.
        """
        height, width = pixel_values.shape[-2:]
        maps = []
        for tokens, stride in zip(super().forward(pixel_values), self.strides):
            size = (math.ceil(height / stride), math.ceil(width / stride))
            if tokens.shape[-2:] != size:
                tokens = F.interpolate(tokens, size=size, mode="bilinear", align_corners=False)
            maps.append(tokens)
        return maps

    @property
    def gradient_checkpointing(self) -> bool:
        """timm's per-block checkpointing of the ViT (LayerNorm only: nothing is updated twice), switched by the
        model's `activation_checkpointing_enable()` / `_disable()` as transformers switches its own layers."""
        return self.model.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        # transformers sets the checkpoint function first; timm's blocks call timm's own (non-reentrant, on the
        # device), so a function with other arguments (use_reentrant=True, offload) would be ignored: refuse it
        function = getattr(self, "_gradient_checkpointing_func", None)
        default = (
            isinstance(function, functools.partial)
            and function.func is checkpoint
            and not function.args
            and function.keywords == {"use_reentrant": False}
        )
        if enable and not default:
            raise ValueError(
                f"backbone={self.model.pretrained_cfg.get('architecture')!r}: a ViT's blocks are checkpointed by "
                f"timm's own non-reentrant checkpoint; activation_checkpointing_kwargs and offload are not "
                f"supported for it. Call activation_checkpointing_enable() without them"
            )
        self.model.set_grad_checkpointing(enable)


def create_single_scale_backbone(name: str, out_indices, output_stride: int, kwargs: dict) -> ResampledFeatureGetter:
    try:
        model = timm.create_model(name, pretrained=False, **_single_scale_kwargs(kwargs))
    except TypeError as error:
        raise _option_error(
            "backbone", name, f"a single-stride backbone must take timm's dynamic_img_size ({error}); e.g. vit_*"
        ) from error
    if not all(-len(model.blocks) <= index < len(model.blocks) for index in out_indices) or len(out_indices) != 2:
        raise _option_error(
            "backbone_out_indices", list(out_indices), f"give two blocks of 0..{len(model.blocks) - 1}"
        )
    return ResampledFeatureGetter(model, tuple(out_indices), (LOW_LEVEL_STRIDE, output_stride))


def create_backbone(
    name: str, output_stride: int, out_indices: list[int] | None = None, kwargs: dict | None = None
) -> nn.Module:
    """The timm backbone `name` (random init) returning [low level, high level] maps (`backbone_layout`'s layout).

    Its state dict keys are timm's feature-extractor keys (for ResNets: the classification model's, less `fc`).
    """
    layout = backbone_layout(name, output_stride, out_indices, kwargs)
    if layout.single_scale:
        return create_single_scale_backbone(name, layout.out_indices, output_stride, kwargs or {})
    return _create_features(name, kwargs or {}, out_indices=layout.out_indices, output_stride=output_stride)


def classification_keys(name: str, output_stride: int, kwargs: dict | None = None) -> list[str]:
    """The state-dict keys of timm's classification model `name` as the backbone is built (meta device)."""
    kwargs = dict(kwargs or {})
    layout = backbone_layout(name, output_stride, None, kwargs)
    kwargs = _single_scale_kwargs(kwargs) if layout.single_scale else {**kwargs, "output_stride": output_stride}
    with torch.device("meta"):
        return list(timm.create_model(name, pretrained=False, **kwargs).state_dict())


def _canonical(key: str) -> str:
    # timm's feature wrappers flatten `stages.0` to `stages_0` and nest the model as `model.`
    return key.removeprefix("model.").replace("_", ".")


def to_backbone_keys(state_dict: dict, backbone: nn.Module, keys: list[str]) -> dict:
    """`state_dict` (timm classification keys `keys`) renamed to `backbone`'s keys; keys the backbone does not hold
    (the classifier, a final norm it does not use) are dropped, any other key is kept for the mismatch report."""
    by_canonical = {_canonical(key): key for key in backbone.state_dict()}
    known = set(keys)
    renamed = {}
    for key, value in state_dict.items():
        target = by_canonical.get(_canonical(key))
        if target is not None:
            renamed[target] = value
        elif key not in known:
            renamed[key] = value
    return renamed


__all__ = ["BackboneLayout", "backbone_layout", "classification_keys", "create_backbone", "to_backbone_keys"]
