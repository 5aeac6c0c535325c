"""Pieces shared by DeepLabV3+ and DeepLabV2: config validation, the dilated timm ResNet backbone, the base
`PreTrainedModel` (input checks, loss, test-time augmentation, sliding window, optimizer groups, weight import).

Only relative imports inside this folder: it is copied verbatim as remote code next to saved models.
"""

import os
from collections.abc import Iterable, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models import clean_state_dict
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import logging

from .label_presets import IGNORE_INDEX, get_label_preset

logger = logging.get_logger(__name__)

ALLOWED_OUTPUT_STRIDES = (8, 16)
TTA_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def default_window_stride(window: int) -> int:
    """The sliding-window stride used with a `window`-pixel window: two thirds of it (at least 1)."""
    return max(1, 2 * window // 3)


def resnet_family_backbones() -> list[str]:
    """timm architecture names whose module is timm's ResNet family (resnet18 ... resnet152, resnet50d, ...)."""
    return timm.list_models(module="resnet")


def require_choice(field: str, value, allowed: Iterable):
    """Raise a `ValueError` naming `field` and the allowed values unless `value` is one of them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is invalid; allowed values: {allowed}")


def require_positive_int(field: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid; allowed values: a positive integer")


def require_positive_number(field: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid; allowed values: a positive number")


def require_probability(field: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{field}={value!r} is invalid; allowed values: a float in [0, 1)")


class DeepLabConfigMixin:
    """Validation and label handling shared by both DeepLab configs (mixed into `PreTrainedConfig` subclasses)."""

    def _init_labels_and_backbone(self, backbone, output_stride, num_labels, kwargs) -> dict:
        """Validate the shared fields, set them, and return the kwargs for `PreTrainedConfig.__init__`.

        `num_labels` defaults to 21 (Pascal VOC) unless `id2label` is given: `from_pretrained` passes only
        `id2label`, and a default `num_labels` would silently override it. An explicit `num_labels` that
        disagrees with `id2label` wins, as in transformers (`from_pretrained(path, num_labels=5)` to fine-tune),
        with generic class names and a warning.
        """
        if kwargs.get("id2label") is not None and num_labels is not None and num_labels != len(kwargs["id2label"]):
            logger.warning(
                f"num_labels={num_labels} replaces the {len(kwargs['id2label'])} class names of id2label "
                "with generic ones (LABEL_0, ...)"
            )
            kwargs.pop("id2label")
            kwargs.pop("label2id", None)
        if kwargs.get("id2label") is not None:
            id2label = {int(index): name for index, name in kwargs["id2label"].items()}
            if sorted(id2label) != list(range(len(id2label))):
                raise ValueError(f"id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)}")
            kwargs["id2label"] = id2label
            kwargs.setdefault("label2id", {name: index for index, name in id2label.items()})
        else:
            num_labels = 21 if num_labels is None else num_labels
            require_positive_int("num_labels", num_labels)
            kwargs["num_labels"] = num_labels
        require_choice("backbone", backbone, resnet_family_backbones())
        require_choice("output_stride", output_stride, ALLOWED_OUTPUT_STRIDES)
        ignore_index = kwargs.setdefault("semantic_loss_ignore_index", IGNORE_INDEX)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"semantic_loss_ignore_index={ignore_index!r} is invalid; allowed values: an integer")
        self.backbone = backbone
        self.output_stride = output_stride
        return kwargs

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> PreTrainedConfig:
        """A config with the class names of a dataset preset (`"pascal_voc"`: 21 classes, `"cityscapes"`: 19)."""
        label_preset = get_label_preset(preset)
        if kwargs.pop("num_labels", label_preset.num_labels) != label_preset.num_labels:
            raise ValueError(f"num_labels must be {label_preset.num_labels} for preset {preset!r}")
        return cls(id2label=label_preset.id2label, **kwargs)


def build_resnet_backbone(name: str, output_stride: int) -> nn.Module:
    """A timm ResNet returning [c1 (layer1), c4 (layer4)], dilated to `output_stride` (8 or 16).

    Randomly initialised (timm's ResNet init); ImageNet weights come later via `load_backbone_weights`.
    Its stride-1 3x3 convs are `AtrousConv2d`s (same parameters and keys, faster on small maps).
    """
    backbone = timm.create_model(
        name, pretrained=False, features_only=True, out_indices=(1, 4), output_stride=output_stride
    )
    return with_atrous_convs(backbone)


def mark_initialized(module: nn.Module):
    """Flag every submodule as initialised so `post_init` leaves the backbone's own init (or loaded weights) alone."""
    for submodule in module.modules():
        submodule._is_hf_initialized = True


# On CPU, maps with at most this many positions are convolved as one matmul over unfolded patches.
SMALL_MAP_POSITIONS = 16


class AtrousConv2d(nn.Conv2d):
    """A stride-1 conv with "same" padding (`padding = dilation * (kernel_size // 2)`, any dilation) with
    two shortcuts for the small feature maps of small crops:

    - it leaves out the kernel rows / columns whose taps land on zero padding only, which happens when
      the dilation is at least the map's height or width (a 48-px crop at output stride 16 gives 3x3 maps
      under ASPP rates 6/12/18, where each dilated 3x3 conv is in fact its centre 1x1 tap);
    - on CPU, a contiguous (NCHW) map of at most `SMALL_MAP_POSITIONS` positions is convolved as one
      matmul over its unfolded patches: oneDNN's conv kernels are tuned for large maps, and on the 3x3 and
      4x4 maps of 512 to 2048 channels measured on a 2-core CPU the matmul was 1.15-2.2x faster forward +
      backward (about even at 64-256 channels). Unfolding a channels_last map is slow, so those stay with oneDNN.

    Same output and gradients as `nn.Conv2d` up to float rounding (the omitted terms are products with
    zeros), same parameters and state-dict keys. [B, in_channels, H, W] -> [B, out_channels, H, W]
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
    """Swap each plain stride-1, "same"-padded `nn.Conv2d` of `module` with a kernel larger than 1x1 (in a
    ResNet: every 3x3 conv but the stride-2 ones) for an `AtrousConv2d` holding the same parameters."""
    for name, conv in list(module.named_modules()):
        if type(conv) is nn.Conv2d and max(conv.kernel_size) > 1 and AtrousConv2d.is_same_padded_stride_1(conv):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, AtrousConv2d.from_conv(conv))
    return module


class ConvNormAct(nn.Sequential):
    """Bias-free conv -> BatchNorm -> ReLU, the building block of the DeepLab heads."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        conv_class = AtrousConv2d if dilation > 1 else nn.Conv2d
        self.conv = conv_class(
            in_channels,
            out_channels,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


def read_state_dict_file(path: str | os.PathLike, description: str) -> dict[str, torch.Tensor]:
    """Read a flat state dict of tensors from a `.safetensors` file or a torch pickle (`.pth`, `.bin`), through
    timm's checkpoint reader: pickles are read with `weights_only=True`, a training checkpoint's weights are taken
    from its `state_dict` / `model` entry (its EMA weights when it has them, as timm does), and DataParallel /
    torch.compile key prefixes (`module.`, `_orig_mod.`) are removed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{description} not found: {path}")
    try:
        state_dict = timm_load_state_dict(path, weights_only=True)
    except Exception as error:
        raise ValueError(f"{description} {path} is not a readable torch or safetensors state dict: {error}") from error
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"{description} {path} does not hold a flat state dict of tensors")
    return state_dict


def check_state_dict_matches(source: dict, target: dict, what: str):
    """Raise a `ValueError` listing missing, unexpected and wrongly shaped keys of `source` against `target`."""
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    mismatched = sorted(
        f"{key}: {tuple(source[key].shape)} vs expected {tuple(target[key].shape)}"
        for key in set(source) & set(target)
        if source[key].shape != target[key].shape
    )
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


def rename_by_prefix(state_dict: dict, prefix_map: Sequence[tuple[str, str]], what: str) -> dict:
    """Rename keys by the first matching `(source_prefix, target_prefix)` rule; keys matching none are an error."""
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        for source_prefix, target_prefix in prefix_map:
            if key.startswith(source_prefix):
                renamed[target_prefix + key[len(source_prefix) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{what} has unknown keys: {', '.join(sorted(unknown)[:20])} ({len(unknown)} in all)")
    return renamed


class DeepLabPreTrainedModel(PreTrainedModel):
    """Base class: a dilated ResNet `backbone` plus a head; subclasses implement `_compute_logits`.

    `_original_prefix_map` lists how the official ST++ module names map onto this model's (`(official, ours)`
    prefixes, first match wins); it drives `load_original_state_dict` and the checkpoint converter.
    """

    main_input_name = "pixel_values"
    base_model_prefix = ""
    input_modalities = ("image",)
    _original_prefix_map: tuple[tuple[str, str], ...] = (("backbone.", "backbone."),)

    def _build_backbone(self, config) -> list[int]:
        """Create `self.backbone`; returns the channel counts of [c1, c4] read from timm's feature_info."""
        self.backbone = build_resnet_backbone(config.backbone, config.output_stride)
        mark_initialized(self.backbone)
        return self.backbone.feature_info.channels()

    def _init_weights(self, module):
        # Head layers get PyTorch's default init, as in the reference; the backbone is flagged as initialised.
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            module.reset_parameters()

    # ----- forward -----

    def _check_inputs(self, pixel_values: torch.Tensor, labels: torch.Tensor | None):
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = (
                tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            )
            raise ValueError(f"pixel_values must be a 4-D tensor [batch, 3, height, width], got {shape}")
        if pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have 3 channels (RGB), got {pixel_values.shape[1]} "
                f"(shape {tuple(pixel_values.shape)})"
            )
        if labels is not None:
            expected = (pixel_values.shape[0], *pixel_values.shape[2:])
            if labels.dim() != 3 or tuple(labels.shape) != expected:
                raise ValueError(
                    f"labels must have shape [batch, height, width] = {expected}, got {tuple(labels.shape)}"
                )
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise ValueError(f"labels must hold integer class ids, got dtype {labels.dtype}")

    def _compute_logits(self, pixel_values: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Head forward: backbone features [c1, c4] -> logits [B, num_labels, H, W] at the input resolution."""
        raise NotImplementedError

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SemanticSegmenterOutput | tuple:
        """
        Args:
            pixel_values: [B, 3, H, W] ImageNet-normalised images.
            labels: optional [B, H, W] class ids; `config.semantic_loss_ignore_index` (255) is ignored.
            output_hidden_states: also return the backbone features (c1 [B, C1, H/4, W/4], c4 [B, C4, H/os, W/os]).

        Returns:
            `SemanticSegmenterOutput` with `logits` [B, num_labels, H, W] and `loss` when labels are given.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_inputs(pixel_values, labels)
        features = self.backbone(pixel_values)
        logits = self._compute_logits(pixel_values, features)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)
        hidden_states = tuple(features) if output_hidden_states else None
        if not return_dict:
            output = tuple(item for item in (logits, hidden_states) if item is not None)
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    def _logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._compute_logits(pixel_values, self.backbone(pixel_values))

    # ----- inference helpers -----

    @torch.no_grad()
    def predict_tta(
        self, pixel_values: torch.Tensor, scales: Sequence[float] = TTA_SCALES, flip: bool = True
    ) -> torch.Tensor:
        """Multi-scale (+ horizontal flip) test-time augmentation, as the method's pseudo-labeling (docs/method.md §5).

        For each scale s the [B, 3, h, w] input is resized to (int(h*s), int(w*s)) (bilinear, align_corners=True);
        the softmax of the prediction on it (and on its flip, flipped back) is resized to (h, w) the same way.
        The flipped copy goes through the network in one batch with the original; the maps are still added in
        the method's order (scale by scale, the original before its flip), in float32 also under autocast.
        Call it in eval mode (BatchNorm running statistics, no dropout), as the method does. The result equals
        the image-by-image, flip-by-flip procedure up to float rounding: oneDNN picks its conv kernels by batch
        size (and the image-pooling branch is a B-row matmul), which changes the last bits, not the method.

        Returns:
            [B, num_labels, h, w] float32 sum of all those softmax maps (argmax gives the pseudo label).
        """
        self._check_inputs(pixel_values, None)
        if not scales:
            raise ValueError("scales must hold at least one scale")
        batch, (height, width) = pixel_values.shape[0], pixel_values.shape[-2:]
        total = None
        for scale in scales:
            size = (int(height * scale), int(width * scale))
            if min(size) < 1:
                raise ValueError(f"scale {scale} shrinks the {height}x{width} input to {size}")
            scaled = F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=True)
            if flip:
                scaled = torch.cat([scaled, scaled.flip(3)])
            probabilities = self._logits(scaled).float().softmax(dim=1)
            if flip:
                probabilities = torch.cat([probabilities[:batch], probabilities[batch:].flip(3)])
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=True)
            for probability in probabilities.split(batch):  # the original, then its flip
                total = probability if total is None else total + probability
        return total

    @torch.no_grad()
    def predict_sliding_window(
        self, pixel_values: torch.Tensor, window: int | tuple[int, int], stride: int | tuple[int, int]
    ) -> torch.Tensor:
        """Predict an image larger than `window` tile by tile (bounded memory, e.g. 1024x2048 Cityscapes).

        Windows of size `window` start every `stride` pixels, with a last one flush with the bottom/right edge;
        inputs smaller than the window are zero-padded (zero = the ImageNet mean after normalisation).

        Returns:
            [B, num_labels, H, W] softmax probabilities averaged over the windows covering each pixel.
        """
        self._check_inputs(pixel_values, None)
        window_h, window_w = (window, window) if isinstance(window, int) else tuple(window)
        stride_h, stride_w = (stride, stride) if isinstance(stride, int) else tuple(stride)
        for field, value in (("window", window_h), ("window", window_w), ("stride", stride_h), ("stride", stride_w)):
            require_positive_int(field, value)
        if stride_h > window_h or stride_w > window_w:
            raise ValueError(f"stride {stride!r} must not exceed window {window!r} (pixels would be skipped)")
        height, width = pixel_values.shape[-2:]
        padded = F.pad(pixel_values, (0, max(window_w - width, 0), 0, max(window_h - height, 0)))
        padded_h, padded_w = padded.shape[-2:]

        def starts(length, size, step):
            positions = list(range(0, length - size + 1, step))
            return positions if positions[-1] == length - size else positions + [length - size]

        probability_sum = padded.new_zeros((padded.shape[0], self.config.num_labels, padded_h, padded_w))
        counts = padded.new_zeros((1, 1, padded_h, padded_w))
        for top in starts(padded_h, window_h, stride_h):
            for left in starts(padded_w, window_w, stride_w):
                tile = padded[:, :, top : top + window_h, left : left + window_w]
                probability_sum[:, :, top : top + window_h, left : left + window_w] += self._logits(tile).softmax(1)
                counts[:, :, top : top + window_h, left : left + window_w] += 1
        return (probability_sum / counts)[:, :, :height, :width]

    # ----- training helpers -----

    def optimizer_param_groups(self, lr: float) -> list[dict]:
        """SGD parameter groups of the method: the backbone at `lr`, everything else at `lr * head_lr_multiplier`."""
        backbone_ids = {id(parameter) for parameter in self.backbone.parameters()}
        backbone, head = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (backbone if id(parameter) in backbone_ids else head).append(parameter)
        return [
            {"name": "backbone", "params": backbone, "lr": lr},
            {"name": "head", "params": head, "lr": lr * self.config.head_lr_multiplier},
        ]

    def load_backbone_weights(self, path: str | os.PathLike) -> None:
        """Initialise the backbone from an ImageNet ResNet file of torchvision or timm layout (the same keys):
        `.pth` / `.bin` (read with `weights_only=True`) or `.safetensors`, e.g. torchvision's `resnet50.pth`.

        `stpp_hf.models.backbone_weights.load_backbone_weights(model, spec)` also takes timm tags and Hub repos.
        """
        path = os.fspath(path)
        state_dict = read_state_dict_file(path, "backbone weights file")
        self.load_backbone_state_dict(state_dict, f"backbone weights file {path}")

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load a ResNet classification state dict into the backbone; `source` names it in errors.

        The classifier (`fc.*`) is ignored; any other missing, unexpected or wrongly shaped key is an error.
        """
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
        what = f"{source}, loaded into a {self.config.backbone} backbone,"
        check_state_dict_matches(state_dict, self.backbone.state_dict(), what)
        self.backbone.load_state_dict(state_dict)

    @classmethod
    def convert_original_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename an official ST++ state dict (module names backbone/head/reduce/fuse/classifier) to this model's."""
        return rename_by_prefix(clean_state_dict(state_dict), cls._original_prefix_map, "original state dict")

    def load_original_state_dict(
        self, state_dict: dict[str, torch.Tensor], what: str = "original state dict", assign: bool = False
    ) -> None:
        """Load a state dict of the official ST++ network (strict: all keys, all shapes).

        `assign=True` adopts the given tensors (for a model built on the meta device).
        """
        converted = self.convert_original_state_dict(state_dict)
        check_state_dict_matches(converted, self.state_dict(), what)
        self.load_state_dict(converted, assign=assign)
