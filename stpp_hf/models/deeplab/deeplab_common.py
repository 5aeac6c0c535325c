"""What DeepLabV3+ and DeepLabV2 share: the timm backbone (`timm_backbones.py`) and the base `PreTrainedModel` (input
checks, loss, test-time augmentation, sliding window, optimizer groups, backbone weight import).

Only relative imports inside this folder: it is copied verbatim as remote code next to saved models.
"""

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils.generic import can_return_tuple

from .checkpointing import make_blocks_checkpointable
from .configuration_deeplab import check_positive_int
from .timm_backbones import EXAMPLE_CHECKPOINTING_BACKBONES, classification_keys, create_backbone, to_backbone_keys

TTA_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def default_window_stride(window: int) -> int:
    """The sliding-window stride used with a `window`-pixel window: two thirds of it (at least 1)."""
    return max(1, 2 * window // 3)


def read_state_dict_file(path: str | os.PathLike, description: str) -> dict[str, torch.Tensor]:
    """Read a flat state dict of tensors from a `.safetensors` file or a torch pickle (`.pth`, `.bin`), through
    timm's checkpoint reader: pickles are read with `weights_only=True`, a training checkpoint's weights are taken
    from its `state_dict` / `model` entry (its EMA weights when it has them, as timm does), and DataParallel /
    torch.compile key prefixes (`module.`, `_orig_mod.`) are removed.

    Args:
        path (`str` or `os.PathLike`): the file.
        description (`str`): what the file is, for the errors (`FileNotFoundError`, `ValueError`).
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


class DeepLabPreTrainedModel(PreTrainedModel):
    """Base class: a timm `backbone` giving [low level, high level] maps (`timm_backbones.py`; the method's: a dilated
    ResNet's layer1 and layer4) and a head; subclasses build the head and define `_compute_logits`."""

    main_input_name = "pixel_values"
    base_model_prefix = ""
    input_modalities = ("image",)
    supports_gradient_checkpointing = True  # per backbone block (checkpointing.py)

    def _build_backbone(self, config) -> list[int]:
        """Create `self.backbone` (random init; weights come later via `load_backbone_weights`); returns the channel
        counts of [low level, high level] read from timm's feature_info."""
        self.backbone = create_backbone(
            config.backbone, config.output_stride, config.backbone_out_indices, config.backbone_kwargs
        )
        make_blocks_checkpointable(self.backbone)
        return list(config.backbone_layout().channels)

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        # transformers' own error would not say which backbone lacks per-block checkpointing, nor what has it
        if not any(hasattr(module, "gradient_checkpointing") for module in self.backbone.modules()):
            if enable:
                raise ValueError(
                    f"backbone={self.config.backbone!r}: activation checkpointing finds no stage of blocks in "
                    f"it (an nn.Sequential of blocks run as a whole) to checkpoint with the BatchNorm statistics "
                    f"updated once per step; use a backbone it works for, e.g. "
                    f"{EXAMPLE_CHECKPOINTING_BACKBONES}, or train without --activation_checkpointing"
                )
            return
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

    def _init_weights(self, module):
        # Head layers get PyTorch's default init, as in the reference. The backbone keeps timm's init or the weights
        # loaded into it, as transformers' `TimmBackbone` leaves its timm model alone.
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) and not self._is_backbone_layer(module):
            module.reset_parameters()

    def _is_backbone_layer(self, module: nn.Module) -> bool:
        return any(module is layer for layer in self.backbone.modules())

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
        """The head.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`): the input, for its size.
            features (`list[torch.Tensor]`): the backbone's [low level (c1), high level (c4)].

        Returns:
            `torch.Tensor` of shape `(batch_size, num_labels, height, width)`: logits at the input resolution.
        """
        raise NotImplementedError

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SemanticSegmenterOutput:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): ImageNet-normalised images.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): class ids;
                `config.semantic_loss_ignore_index` (255) is ignored by the cross-entropy loss.
            output_hidden_states (`bool`, *optional*): also return the backbone features c1 `(batch_size, C1,
                height / 4, width / 4)` and c4 `(batch_size, C4, height / output_stride, width / output_stride)`
                (c1 at the backbone's level nearest stride 4).
            return_dict (`bool`, *optional*): `False` gives the tuple `(loss?, logits, hidden_states?)`.

        Returns:
            `SemanticSegmenterOutput` with `logits` of shape `(batch_size, num_labels, height, width)` and `loss` when
            `labels` are given.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        self._check_inputs(pixel_values, labels)
        features = self.backbone(pixel_values)
        logits = self._compute_logits(pixel_values, features)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)
        hidden_states = tuple(features) if output_hidden_states else None
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    def _logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._compute_logits(pixel_values, self.backbone(pixel_values))

    @torch.no_grad()
    def predict_tta(
        self, pixel_values: torch.Tensor, scales: Sequence[float] = TTA_SCALES, flip: bool = True
    ) -> torch.Tensor:
        """Multi-scale (+ horizontal flip) test-time augmentation, as the method's pseudo-labeling (docs/method.md §5).

        For each scale s the input of size (h, w) is resized to (int(h*s), int(w*s)) (bilinear, align_corners=True);
        the softmax of the prediction on it (and on its flip, flipped back) is resized to (h, w) the same way.
        The flipped copy goes through the network in one batch with the original; the maps are still added in
        the method's order (scale by scale, the original before its flip), in float32 also under autocast.
        Call it in eval mode (BatchNorm running statistics, no dropout), as the method does. The result equals
        the image-by-image, flip-by-flip procedure up to float rounding: oneDNN picks its conv kernels by batch
        size (and the image-pooling branch is a B-row matmul), which changes the last bits, not the method.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, h, w)`): ImageNet-normalised images.
            scales (`Sequence[float]`, defaults to `(0.5, 0.75, 1.0, 1.5, 2.0)`): the method's scales.
            flip (`bool`, defaults to `True`): also predict on the horizontal flip of each scaled input.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_labels, h, w)`: the float32 sum of all those softmax maps
            (argmax gives the pseudo label).
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

        Windows start every `stride` pixels, with a last one flush with the bottom / right edge; inputs smaller than
        the window are zero-padded (zero = the ImageNet mean after normalisation).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): ImageNet-normalised images.
            window (`int` or `tuple[int, int]`): window (height, width) in pixels.
            stride (`int` or `tuple[int, int]`): step between windows, at most the window.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`: softmax probabilities averaged
            over the windows covering each pixel.
        """
        self._check_inputs(pixel_values, None)
        window_h, window_w = (window, window) if isinstance(window, int) else tuple(window)
        stride_h, stride_w = (stride, stride) if isinstance(stride, int) else tuple(stride)
        for name, value in (("window", window_h), ("window", window_w), ("stride", stride_h), ("stride", stride_w)):
            check_positive_int(name, value)
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

    def optimizer_param_groups(self, lr: float) -> list[dict]:
        """SGD parameter groups of the method: the backbone at `lr`, everything else at `lr * head_lr_multiplier`.

        Returns:
            `list[dict]`: `[{"name": "backbone", "params", "lr"}, {"name": "head", "params", "lr"}]`.
        """
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
        """Initialise the backbone from a timm classification state dict file of its architecture (for ResNets:
        torchvision's layout, the same keys): `.pth` / `.bin` (read with `weights_only=True`) or `.safetensors`,
        e.g. torchvision's `resnet50.pth`.

        `stpp_hf.models.backbone_weights.load_backbone_weights(model, spec)` also takes timm tags and Hub repos.
        """
        path = os.fspath(path)
        state_dict = read_state_dict_file(path, "backbone weights file")
        self.load_backbone_state_dict(state_dict, f"backbone weights file {path}")

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load a timm classification state dict of the backbone's architecture into the backbone (strict).

        Args:
            state_dict (`dict[str, torch.Tensor]`): timm keys (for ResNets also torchvision's); keys of the
                classification model that the backbone does not hold (the classifier, e.g. `fc.*`, `head.*`) are
                ignored, any other missing, unexpected or wrongly shaped key is a `ValueError`.
            source (`str`): names the weights in errors.
        """
        config = self.config
        keys = classification_keys(config.backbone, config.output_stride, config.backbone_kwargs)
        state_dict = to_backbone_keys(state_dict, self.backbone, keys)
        what = f"{source}, loaded into a {config.backbone} backbone,"
        check_state_dict_matches(state_dict, self.backbone.state_dict(), what)
        self.backbone.load_state_dict(state_dict)
