"""The recipe (docs/method.md §2): the defaults of each dataset, and its arithmetic, one owner for every process
count: the global batch split over processes and accumulation steps, the lr scaled to the global batch, the poly
schedule, the SGD constants."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.deeplab.configuration_deeplabv2 import DeepLabV2Config
from .errors import ConfigError

REFERENCE_BATCH_SIZE = 16  # the global batch the base lr is stated for
POLY_POWER = 0.9
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4

SYNTHETIC = "synthetic"
HUB = "hub"  # a `datasets` dataset named by --dataset_name
# the paper's DeepLabV2 is a ResNet-101 (docs/method.md §4): the model's own default
DEEPLABV2_BACKBONE = DeepLabV2Config.backbone


@dataclass(frozen=True)
class RecipeDefaults:
    """The defaults of one dataset (docs/method.md §2). ``base_lr`` is for a global batch of 16."""

    epochs: int
    base_lr: float
    crop_size: int
    base_size: int
    val_batch_size: int
    global_batch_size: int = 16
    backbone: str = "resnet50"
    output_stride: int = 8


RECIPE_DEFAULTS: dict[str, RecipeDefaults] = {
    "pascal": RecipeDefaults(epochs=80, base_lr=0.001, crop_size=321, base_size=400, val_batch_size=1),
    "cityscapes": RecipeDefaults(epochs=240, base_lr=0.004, crop_size=721, base_size=2048, val_batch_size=4),
    "folder": RecipeDefaults(epochs=80, base_lr=0.001, crop_size=321, base_size=400, val_batch_size=1),
    HUB: RecipeDefaults(epochs=80, base_lr=0.001, crop_size=321, base_size=400, val_batch_size=1),
    # small images, a ResNet-18 from scratch at output stride 16, global batch 8 and 6 epochs: minutes on 2 CPU cores
    SYNTHETIC: RecipeDefaults(
        epochs=6,
        base_lr=0.02,
        crop_size=48,
        base_size=64,
        val_batch_size=25,
        global_batch_size=8,
        backbone="resnet18",
        output_stride=16,
    ),
}


def recipe_default(setting: str) -> str:
    """The default of ``setting`` (a :class:`RecipeDefaults` field) for each kind of data, in words for the options'
    help, e.g. ``"default: 80 (pascal, folder, hub), 240 (cityscapes), 6 (synthetic)"``."""
    kinds_by_value: dict = {}
    for kind, defaults in RECIPE_DEFAULTS.items():
        kinds_by_value.setdefault(getattr(defaults, setting), []).append(kind)
    return "default: " + ", ".join(f"{value} ({', '.join(kinds)})" for value, kinds in kinds_by_value.items())


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """``base_lr / 16 * global_batch_size``: the peak lr of the backbone group."""
    return base_lr / REFERENCE_BATCH_SIZE * global_batch_size


def steps_per_epoch(num_items: int, global_batch_size: int) -> int:
    """Optimizer steps of one epoch over ``num_items`` training items (drop_last)."""
    return num_items // global_batch_size


def poly_factor(step: int, total_steps: int) -> float:
    """``(1 - step / total)^0.9``: the factor of the lr used for optimizer step ``step`` (0-based)."""
    return (1.0 - step / total_steps) ** POLY_POWER


def per_device_batch_size(global_batch_size: int, num_processes: int, accumulation_steps: int) -> int:
    """``global / (processes x accumulation)``; a :class:`ConfigError` naming the option when it does not divide."""
    share = num_processes * accumulation_steps
    if global_batch_size % share:
        raise ConfigError(
            f"--global_batch_size {global_batch_size} is not divisible by {num_processes} processes x "
            f"{accumulation_steps} accumulation steps: pick a multiple of {share} "
            f"or change --gradient_accumulation_steps"
        )
    return global_batch_size // share


def describe_optimizer() -> str:
    """The schedule and optimizer constants in words, for the dry run."""
    return f"poly {POLY_POWER:g}, SGD momentum {MOMENTUM:g}, wd {WEIGHT_DECAY:g}"
