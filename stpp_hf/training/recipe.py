"""The recipe's arithmetic (docs/method.md §2), one owner for every process count: the global batch split over
processes and accumulation steps, the lr scaled to the global batch, the poly schedule, the SGD constants."""

from __future__ import annotations

from .errors import ConfigError

REFERENCE_BATCH_SIZE = 16  # the global batch the base lr is stated for
POLY_POWER = 0.9
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


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
