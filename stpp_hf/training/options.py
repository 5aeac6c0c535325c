"""The options of ``stpp-train``, the only place an option is named: four ``HfArgumentParser`` dataclasses
(:class:`DataArguments` with the ``datasets`` options of :class:`HubDataArguments`, :class:`ModelArguments`,
:class:`RunArguments`), each field with its type, default and help, and its check in the class's ``CHECKS`` (run by
:func:`check_fields` whenever an instance is made; not in a field's metadata, which the parser hands to
``argparse``). They come from the command line, optionally after a recipe file (YAML or JSON with the same keys,
e.g. ``examples/recipes/pascal-1_16-r50.yaml``) whose values the command line overrides (:func:`parse_arguments`).
The checks across options and the defaults are :mod:`~stpp_hf.training.config`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

import yaml
from huggingface_hub.dataclasses import type_validator
from transformers import HfArgumentParser

from ..data.hub.partition import parse_fraction
from ..models.deeplab.configuration_deeplab import OUTPUT_STRIDES
from .errors import ConfigError
from .label_next import DEFAULT_LABEL_NEXT
from .recipe import DEEPLABV2_BACKBONE, REFERENCE_BATCH_SIZE, recipe_default

# what a recipe file may hold besides options: where its published number comes from
RECIPE_INFO_KEY = "paper"
RECIPE_INFO_KEYS = ("published_miou", "table", "note")
# an hour: above the longest phase one process works alone at the method's scale (building Cityscapes' dataset
# caches, downloading a Hub dataset), while the heartbeat ends a run with a stopped process much sooner
COLLECTIVE_TIMEOUT_S = 3600.0
HEARTBEAT_TIMEOUT_S = 120.0
# --mixed_precision's choices (accelerate's, less fp8)
Precision = Literal["no", "fp16", "bf16"]
PRECISIONS = typing.get_args(Precision)


# ---- the checks of one option: ``check(name, value)`` raises a ConfigError naming it ------------------------


def at_least(minimum: int) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is not None and value < minimum:
            raise ConfigError(f"--{name} must be >= {minimum}, got {value}")

    return check


def _positive(name: str, value: Optional[float]) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"--{name} must be > 0, got {value}")


def _seconds(name: str, value: float) -> None:
    # checked before the processes connect: the process group is made with it
    if not 0 < value < float("inf"):
        raise ConfigError(f"--{name} must be a positive number of seconds, got {value}")


def _output_stride(name: str, value: Optional[int]) -> None:
    if value is not None and value not in OUTPUT_STRIDES:
        raise ConfigError(f"--{name} must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {value}")


def _fraction(name: str, value: Optional[str]) -> None:
    if value is not None:
        try:
            parse_fraction(value)
        except ValueError as error:
            raise ConfigError(f"--{error}") from None


def check_fields(arguments) -> None:
    """Run the check of every field of ``arguments`` (a float must be finite too)."""
    for option in dataclasses.fields(arguments):
        value = getattr(arguments, option.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{option.name} must be a finite number, got {value}")
        if option.name in arguments.CHECKS:
            arguments.CHECKS[option.name](option.name, value)


class _Checked:
    """Checks its fields whenever an instance is made (by the parser, by hand or by ``dataclasses.replace``):
    ``CHECKS`` holds the check of each field that has one."""

    CHECKS: ClassVar[dict[str, Callable[[str, Any], None]]] = {}

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class HubDataArguments(_Checked):
    """Train on a ``datasets`` segmentation dataset (the flags of the transformers semantic-segmentation examples)."""

    CHECKS: ClassVar[dict[str, Callable[[str, Any], None]]] = {
        "num_labeled": at_least(1),
        "labeled_fraction": _fraction,
    }

    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset id (OWNER/NAME) or a local directory load_dataset reads."}
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration of the dataset."})
    image_column: str = field(default="image", metadata={"help": "Column of the images."})
    label_column: str = field(
        default="label",
        metadata={"help": "Column of the class-index masks ('annotation' is used when 'label' is absent)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split partitioned into labeled and unlabeled rows."})
    val_split: str = field(default="validation", metadata={"help": "Split the stages are evaluated on."})
    num_labeled: Optional[int] = field(default=None, metadata={"help": "Labeled rows of the train split."})
    labeled_fraction: Optional[str] = field(
        default=None,
        metadata={"help": "Labeled fraction of the train split, e.g. '1/16' or 0.0625."},
    )
    partition_seed: int = field(default=0, metadata={"help": "Seed of the labeled / unlabeled draw."})
    id2label: Optional[str] = field(
        default=None, metadata={"help": "JSON file {'0': 'name', ...} (default: the dataset's id2label.json)."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the dataset lazily, without downloading it first: selection streams the unlabeled rows, "
            "each label stage copies the images it labels into the run directory (retraining reads them there)."
        },
    )


@dataclass
class DataArguments(HubDataArguments):  # --dataset_name etc.: a `datasets` dataset instead of --data_root
    CHECKS: ClassVar[dict[str, Callable[[str, Any], None]]] = {
        **HubDataArguments.CHECKS,
        "synthetic_num_labeled": at_least(1),
        "synthetic_num_unlabeled": at_least(1),
        "synthetic_num_val": at_least(1),
        "synthetic_image_size": at_least(16),
        "num_workers": at_least(0),
    }
    dataset: Optional[Literal["pascal", "cityscapes", "folder"]] = field(
        default="pascal",
        metadata={
            "help": "Layout of --data_root. Without --data_root the built-in synthetic dataset is generated "
            "(resolved as None there)."
        },
    )
    data_root: Optional[str] = field(default=None, metadata={"help": "Dataset root; omit to run on synthetic data."})
    split: Optional[str] = field(
        default=None,
        metadata={"help": "Shipped partition, e.g. '1_16/split_0' (pascal) or '1_30/split_0' (cityscapes)."},
    )
    labeled_id_path: Optional[str] = field(default=None, metadata={"help": "Split file of labeled images."})
    unlabeled_id_path: Optional[str] = field(default=None, metadata={"help": "Split file of unlabeled images."})
    val_id_path: Optional[str] = field(default=None, metadata={"help": "Split file of val images."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the generated synthetic dataset."})
    synthetic_num_labeled: int = 20
    # several hundred unlabeled images make the ST++ gain clear; 100 val images keep its noise low
    synthetic_num_unlabeled: int = 300
    synthetic_num_val: int = 100
    synthetic_image_size: int = field(
        default=64, metadata={"help": "Side of the synthetic images (64 keeps the demo fast)."}
    )
    num_workers: Optional[int] = field(
        default=None,
        metadata={
            "help": "DataLoader workers per process for training, evaluation, selection and labeling (does not "
            "change results: may change on a relaunch). Default: on CUDA min(8, CPU cores / processes on the "
            "node); on CPU 0 (workers would compete with the training for the same cores)."
        },
    )


@dataclass
class ModelArguments(_Checked):
    CHECKS: ClassVar[dict[str, Callable[[str, Any], None]]] = {"output_stride": _output_stride}
    model: Literal["deeplabv3plus", "deeplabv2"] = "deeplabv3plus"
    backbone: Optional[str] = field(
        default=None,
        metadata={
            "help": "timm backbone: the method's ResNets or any timm model with feature maps (convnext_base, "
            f"vit_base_patch14_dinov2, ...); {recipe_default('backbone')}, {DEEPLABV2_BACKBONE} for deeplabv2 on "
            "real data."
        },
    )
    output_stride: Optional[int] = field(
        default=None, metadata={"help": f"8 (the method's) or 16; {recipe_default('output_stride')}."}
    )
    backbone_weights: Optional[str] = field(
        default=None,
        metadata={
            "help": "Backbone initialisation: a timm pretrained tag or Hub id "
            "(resnet101.tv_in1k, timm/resnet101.a1h_in1k), "
            "a local .pth / .safetensors file, or 'none'. Default: <backbone>.tv_in1k "
            "(torchvision's ImageNet weights, "
            "the method's) on real data for a ResNet (other backbones need it), none on synthetic data."
        },
    )
    coco_init: Optional[str] = field(
        default=None,
        metadata={
            "help": "DeepLabV2 only: the COCO-pretrained DeepLabV2-ResNet-101 checkpoint (.pth), the paper's init."
        },
    )


@dataclass
class RunArguments(_Checked):
    CHECKS: ClassVar[dict[str, Callable[[str, Any], None]]] = {
        "epochs": at_least(1),
        "global_batch_size": at_least(1),
        "per_device_batch_size": at_least(1),
        "lr": _positive,
        "crop_size": at_least(1),
        "base_size": at_least(2),
        "val_batch_size": at_least(1),
        "inference_batch_size": at_least(1),
        "sliding_window": at_least(1),
        "gradient_accumulation_steps": at_least(1),
        "collective_timeout_s": _seconds,
        "heartbeat_timeout_s": _seconds,
        "save_steps": at_least(0),
        "label_next": at_least(0),
    }
    output_dir: str = field(default="runs/stpp", metadata={"help": "Run directory; relaunching in it resumes."})
    framework: Literal["suponly", "st", "stpp"] = "stpp"
    teacher: Literal["best", "last"] = field(
        default="best", metadata={"help": "Pseudo labels from the best-on-val model (reference) or the last epoch."}
    )
    epochs: Optional[int] = field(
        default=None, metadata={"help": f"Epochs per training stage; {recipe_default('epochs')}."}
    )
    global_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Images per optimizer step over all processes and accumulation steps; "
            f"{recipe_default('global_batch_size')}."
        },
    )
    per_device_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Instead of --global_batch_size: images per process and forward pass."},
    )
    lr: Optional[float] = field(
        default=None,
        metadata={
            "help": f"Base lr for a global batch of {REFERENCE_BATCH_SIZE} ({recipe_default('base_lr')}); "
            f"the lr used is lr / {REFERENCE_BATCH_SIZE} x global batch."
        },
    )
    crop_size: Optional[int] = field(
        default=None, metadata={"help": f"Side of the training crops; {recipe_default('crop_size')}."}
    )
    base_size: Optional[int] = field(
        default=None,
        metadata={"help": f"Long side that the random rescale is drawn around; {recipe_default('base_size')}."},
    )
    val_batch_size: Optional[int] = field(
        default=None, metadata={"help": f"Val images per batch; {recipe_default('val_batch_size')}."}
    )
    inference_batch_size: int = field(default=8, metadata={"help": "Images per batch in selection / pseudo-labeling."})
    sliding_window: Optional[int] = field(
        default=None, metadata={"help": "Evaluate with this window (stride 2/3 of it)."}
    )
    gradient_accumulation_steps: int = 1
    mixed_precision: Optional[Precision] = field(
        default=None,
        metadata={
            "help": "no (fp32), fp16 or bf16. Default: what `accelerate launch --mixed_precision` or the accelerate "
            "config gives (ACCELERATE_MIXED_PRECISION), else no."
        },
    )
    allow_emulated_precision: bool = field(
        default=False,
        metadata={
            "help": "Run a --mixed_precision that a device does not compute natively (refused by default: bf16 on "
            "a CPU without avx512_bf16 / AMX, or a GPU before compute capability 8.0; docs/precision.md)."
        },
    )
    sync_bn: Optional[bool] = field(
        default=None, metadata={"help": "SyncBatchNorm (default: on with several CUDA GPUs; needs CUDA)."}
    )
    channels_last: Optional[bool] = field(
        default=None,
        metadata={"help": "channels_last convolutions in training (default: on CUDA only; slower on CPU here)."},
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each backbone block in backward instead of keeping its activations: about half the "
            "training memory for one more backbone forward per step; results unchanged (may change on a relaunch)."
        },
    )
    seed: int = 0
    collective_timeout_s: float = field(
        default=COLLECTIVE_TIMEOUT_S,
        metadata={
            "help": "Seconds a process waits in a collective (a barrier, a reduction) for the others before the "
            "run ends with an error: the longest that one process may work alone, e.g. the main process building "
            "the dataset caches or downloading a Hub dataset."
        },
    )
    heartbeat_timeout_s: float = field(
        default=HEARTBEAT_TIMEOUT_S,
        metadata={
            "help": "With several processes: a process that has not answered for this long (stopped, frozen, node "
            "lost) ends the run, named, within 1.1 x this time plus the launcher's 30 s grace (docs/processes.md)."
        },
    )
    save_steps: int = field(
        default=0,
        metadata={
            "help": "Also save a step checkpoint every N optimizer steps inside an epoch (0: after each epoch only); "
            "a stop signal always saves one (docs/preemption.md). Does not change results."
        },
    )
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = False
    push_stage_branches: bool = False
    dry_run: bool = field(default=False, metadata={"help": "Print the resolved recipe and exit without training."})
    redo_stage: Optional[str] = field(
        default=None,
        metadata={
            "help": "Redo this stage and every stage after it (e.g. 'suponly' after its files were damaged); "
            "the finished stages before it are kept."
        },
    )
    label_next: int = field(
        default=DEFAULT_LABEL_NEXT,
        metadata={
            "help": "ST++: write the K least reliable unlabeled images of the selection to label_next.csv / .png "
            "(an annotation aid, not part of the method; 0: none)."
        },
    )


ARGUMENT_CLASSES = (DataArguments, ModelArguments, RunArguments)


# ---- parsing -----------------------------------------------------------------------------------


def _field_types() -> dict[str, Any]:
    """``{option: type annotation}`` of all three argument classes."""
    result = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        result.update({f.name: hints[f.name] for f in dataclasses.fields(cls)})
    return result


def _check_type(key: str, value: Any, annotation: Any, where: str) -> Any:
    """``value`` if it fits ``annotation`` (ints are accepted for floats), else a :class:`ConfigError`."""
    inner = annotation  # the type of an Optional
    if typing.get_origin(annotation) is not Literal:
        inner = next((arg for arg in typing.get_args(annotation) if arg is not type(None)), annotation)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        type_validator(key, value, annotation)
    except TypeError:
        if typing.get_origin(inner) is Literal:
            expected = f"one of {', '.join(map(repr, typing.get_args(inner)))}, got {value!r}"
        else:
            expected = f"{inner.__name__}, got {value!r} ({type(value).__name__})"
        raise ConfigError(f"{where}: {key} must be {expected}") from None
    return value


def read_recipe_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(options, paper info)`` of a YAML / JSON recipe file, each value type-checked; an unknown key is
    an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    info = raw.pop(RECIPE_INFO_KEY, None) or {}
    if not isinstance(info, dict) or set(info) - set(RECIPE_INFO_KEYS):
        raise ConfigError(
            f"{path}: '{RECIPE_INFO_KEY}' must be a mapping with keys among {', '.join(RECIPE_INFO_KEYS)}"
        )
    known = _field_types()
    options = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (options are those of stpp-train --help)")
        options[key] = _check_type(key, value, known[key], str(path))
    return options, info


def parse_arguments(argv: Optional[list[str]] = None) -> tuple[DataArguments, ModelArguments, RunArguments, dict]:
    """``(data, model, run, paper info)`` from ``argv``: an optional recipe file first (``.yaml``, ``.yml``
    or ``.json``), then ``--option value`` pairs that override it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    info: dict = {}
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        options, info = read_recipe_file(argv.pop(0))
        parser.set_defaults(**options)
    data, model, run, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        hint = (
            " (--batch_size is gone: give --global_batch_size or --per_device_batch_size)"
            if "--batch_size" in unknown
            else ""
        )
        raise ConfigError(f"unknown options {' '.join(unknown)}{hint}; see --help")
    return data, model, run, info
