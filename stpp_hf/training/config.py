"""The typed run configuration of ``stpp-train``: options, per-dataset recipe defaults, validation, resolution.

Options are three ``HfArgumentParser`` dataclasses (:class:`DataArguments`, :class:`ModelArguments`,
:class:`RunArguments`). They come from the command line, optionally after a recipe file (YAML or JSON
with the same keys, e.g. ``examples/recipes/pascal-1_16-r50.yaml``) whose values the command line
overrides. :func:`parse_arguments` type-checks the file's values and :func:`validate_arguments` checks
every option before any data work. :func:`resolve_run_config` then fills the defaults of
:data:`RECIPE_DEFAULTS` once into a frozen :class:`RunConfig`, which holds every setting that can
change results and is what a relaunch must match (:func:`config_differences`), except the
:data:`NON_RESULT_SETTINGS`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import timm
import yaml
from transformers import HfArgumentParser

from ..data.hub_dataset import HubDataArguments
from ..file_io import atomic_write_json, json_text, sha256_file
from ..log import get_logger
from ..models.backbone_weights import WEIGHT_FILE_SUFFIXES
from ..models.deeplab.deeplab_common import default_window_stride
from ..models.deeplab.timm_backbones import backbone_layout
from .errors import ConfigError
from .label_next import DEFAULT_LABEL_NEXT
from .recipe import per_device_batch_size, scaled_lr
from .run_layout import RunLayout
from .stages import build_stages, snapshot_epochs

logger = get_logger(__name__)

DATASETS = ("pascal", "cityscapes", "folder")
SYNTHETIC = "synthetic"
HUB = "hub"  # a `datasets` dataset named by --dataset_name
# what a recipe file may hold besides options: where its published number comes from
RECIPE_INFO_KEY = "paper"
RECIPE_INFO_KEYS = ("published_miou", "table", "note")
# settings that cannot change the trained weights or the reported numbers: a relaunch may change them
NON_RESULT_SETTINGS = frozenset(
    {
        "output_dir",
        "report_to",
        "push_to_hub",
        "hub_model_id",
        "hub_private",
        "push_stage_branches",
        "num_workers",
        "save_steps",
        "dry_run",
        "redo_stage",
        # where the data lies: the data is identified by content (the ``data`` section), so it may move
        "data_root",
        "labeled_id_path",
        "unlabeled_id_path",
        "val_id_path",
        "label_next",
        "activation_checkpointing",  # the same loss, gradients and BatchNorm buffers bit for bit
        "allow_emulated_precision",
    }
)
# how the global batch is laid out on the hardware: a relaunch may change it (a preempted job requeued onto
# fewer GPUs) as long as the global batch and the lr stay, which keeps every step's images and updates; only the
# BatchNorm batch (per device, or across devices with SyncBatchNorm) then differs, and a warning says so
BATCH_LAYOUT_SETTINGS = frozenset({"num_processes", "per_device_batch_size", "gradient_accumulation_steps", "sync_bn"})
BATCH_SETTINGS = ("global_batch_size", "lr")
# settings an earlier version did not record: a run directory without them resumes (they cannot be checked)
ADDED_SETTINGS = {
    "backbone_weights_sha256": "--backbone_weights",
    "coco_init_sha256": "--coco_init",
}


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
# an hour: above the longest phase one process works alone at the method's scale (building Cityscapes' dataset
# caches, downloading a Hub dataset), while the heartbeat ends a run with a stopped process much sooner
COLLECTIVE_TIMEOUT_S = 3600.0
HEARTBEAT_TIMEOUT_S = 120.0
# DataLoader workers per process by default on CUDA: decoding keeps a GPU busy with a few, more only cost memory
MAX_DEFAULT_WORKERS = 8
# the paper's DeepLabV2 is a ResNet-101 (docs/method.md §4)
DEEPLABV2_BACKBONE = "resnet101"


@dataclass
class DataArguments(HubDataArguments):  # --dataset_name etc.: a `datasets` dataset instead of --data_root
    dataset: Literal["pascal", "cityscapes", "folder"] = field(
        default="pascal",
        metadata={"help": "Dataset layout. Without --data_root the built-in synthetic dataset is generated."},
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
class ModelArguments:
    model: Literal["deeplabv3plus", "deeplabv2"] = "deeplabv3plus"
    backbone: Optional[str] = field(
        default=None,
        metadata={
            "help": "timm backbone: the method's ResNets (default: resnet50; resnet101 for deeplabv2; resnet18 on "
            "synthetic data) or any timm model with feature maps (convnext_base, vit_base_patch14_dinov2, ...)."
        },
    )
    output_stride: Optional[int] = field(
        default=None, metadata={"help": "8 (the method's) or 16 (default on synthetic data)."}
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
class RunArguments:
    output_dir: str = field(default="runs/stpp", metadata={"help": "Run directory; relaunching in it resumes."})
    framework: Literal["suponly", "st", "stpp"] = "stpp"
    teacher: Literal["best", "last"] = field(
        default="best", metadata={"help": "Pseudo labels from the best-on-val model (reference) or the last epoch."}
    )
    epochs: Optional[int] = field(
        default=None, metadata={"help": "Epochs per training stage (80 Pascal, 240 Cityscapes)."}
    )
    global_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Images per optimizer step over all processes and accumulation steps "
            "(16, the paper's; 8 on synthetic data)."
        },
    )
    per_device_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Instead of --global_batch_size: images per process and forward pass."}
    )
    lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "Base lr for a global batch of 16 (0.001 Pascal, 0.004 Cityscapes); "
            "the lr used is base_lr / 16 * global batch."
        },
    )
    crop_size: Optional[int] = None
    base_size: Optional[int] = field(
        default=None, metadata={"help": "Long side that the random rescale is drawn around."}
    )
    val_batch_size: Optional[int] = None
    inference_batch_size: int = field(default=8, metadata={"help": "Images per batch in selection / pseudo-labeling."})
    sliding_window: Optional[int] = field(
        default=None, metadata={"help": "Evaluate with this window (stride 2/3 of it)."}
    )
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
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


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, defaults resolved (``None`` only where a setting does not apply).

    ``dataset`` is ``"synthetic"`` for the built-in data. ``lr`` is ``base_lr / 16 * global_batch_size``,
    the backbone group's peak lr; ``per_device_batch_size * num_processes * gradient_accumulation_steps
    == global_batch_size``.
    """

    dataset: str
    data_root: Optional[str]
    split: Optional[str]
    labeled_id_path: Optional[str]
    unlabeled_id_path: Optional[str]
    val_id_path: Optional[str]
    synthetic: Optional[dict]
    hub_dataset: Optional[dict]  # the HubDataArguments of a --dataset_name run
    model: str
    backbone: str
    output_stride: int
    backbone_weights: str
    coco_init: Optional[str]
    backbone_weights_sha256: Optional[str]  # the content of a --backbone_weights FILE (a Hub tag names its own)
    coco_init_sha256: Optional[str]
    framework: str
    teacher: str
    epochs: int
    global_batch_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    base_lr: float
    lr: float
    crop_size: int
    base_size: int
    val_batch_size: int
    inference_batch_size: int
    sliding_window: Optional[int]
    mixed_precision: str
    allow_emulated_precision: bool
    sync_bn: bool
    channels_last: bool
    activation_checkpointing: bool
    seed: int
    num_workers: int
    save_steps: int
    output_dir: str
    report_to: str
    push_to_hub: bool
    hub_model_id: Optional[str]
    hub_private: bool
    push_stage_branches: bool
    dry_run: bool
    redo_stage: Optional[str]
    label_next: int

    @property
    def is_synthetic(self) -> bool:
        return self.dataset == SYNTHETIC

    @property
    def sliding_window_stride(self) -> Optional[tuple[int, int]]:
        """``(window, stride)`` of sliding-window evaluation (stride 2/3 of the window), or ``None``."""
        window = self.sliding_window
        return None if window is None else (window, default_window_stride(window))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json_text(self.to_dict(), "the run config", indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        values = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"data"})
        missing = sorted(names - set(values))
        if unknown or missing:
            raise ConfigError(f"not a RunConfig: unknown keys {unknown}, missing keys {missing}")
        return cls(**{name: values[name] for name in names})


# ---- parsing -----------------------------------------------------------------------------------


def _field_types() -> dict[str, tuple[Any, Any]]:
    """``{option: (type annotation, default)}`` of all three argument classes."""
    result = {}
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            result[f.name] = (hints[f.name], f.default)
    return result


def _check_value(key: str, value: Any, annotation: Any, where: str) -> Any:
    """``value`` if it fits ``annotation`` (ints are accepted for floats), else a :class:`ConfigError`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _check_value(key, value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif annotation is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported option type {annotation} of {key}")
    if not ok:
        raise ConfigError(f"{where}: {key} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
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
        options[key] = _check_value(key, value, known[key][0], str(path))
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


# ---- validation ---------------------------------------------------------------------------------


def _positive(name: str, value: Optional[int | float], minimum: int | float = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum}, got {value}")


def validate_arguments(data: DataArguments, model: ModelArguments, run: RunArguments) -> None:
    """Check every option (no data is read besides the existence of the files named); raises
    :class:`ConfigError` naming the option."""
    for arguments in (data, model, run):
        for option in dataclasses.fields(arguments):
            value = getattr(arguments, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{option.name} must be a finite number, got {value}")
    for name in (
        "epochs",
        "global_batch_size",
        "per_device_batch_size",
        "crop_size",
        "val_batch_size",
        "sliding_window",
    ):
        _positive(name, getattr(run, name))
    _positive("base_size", run.base_size, 2)
    for name in ("inference_batch_size", "gradient_accumulation_steps"):
        _positive(name, getattr(run, name))
    for name in ("synthetic_num_labeled", "synthetic_num_unlabeled", "synthetic_num_val"):
        _positive(name, getattr(data, name))
    _positive("synthetic_image_size", data.synthetic_image_size, 16)
    _positive("num_workers", data.num_workers, 0)
    _positive("label_next", run.label_next, 0)
    check_process_timeouts(run)
    _positive("save_steps", run.save_steps, 0)
    if run.lr is not None and not run.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {run.lr}")
    if run.global_batch_size is not None and run.per_device_batch_size is not None:
        raise ConfigError("give --global_batch_size or --per_device_batch_size, not both")
    if model.output_stride not in (None, 8, 16):
        raise ConfigError(f"--output_stride must be 8 or 16, got {model.output_stride}")
    if run.framework == "stpp" and run.epochs is not None:
        try:
            snapshot_epochs(run.epochs)
        except ValueError as error:
            raise ConfigError(f"--epochs {run.epochs}: {error}") from None
    stage_names = [stage.name for stage in build_stages(run.framework)]
    if run.redo_stage is not None and run.redo_stage not in stage_names:
        raise ConfigError(
            f"--redo_stage must be one of the {run.framework} stages {stage_names}, got {run.redo_stage!r}"
        )
    if run.push_to_hub and run.hub_model_id is None:
        raise ConfigError("--push_to_hub needs --hub_model_id")
    if model.coco_init is not None:
        if model.model != "deeplabv2":
            raise ConfigError("--coco_init is a DeepLabV2 checkpoint: use it with --model deeplabv2")
        if model.backbone_weights is not None:
            raise ConfigError("--coco_init already initialises the backbone: drop --backbone_weights")
        if not run.dry_run and not Path(model.coco_init).is_file():
            raise ConfigError(f"--coco_init {model.coco_init} does not exist")
    if data.streaming and data.dataset_name is None:
        raise ConfigError(
            "--streaming reads a `datasets` dataset lazily: it needs --dataset_name (--data_root layouts and the "
            "synthetic data are read from disk)"
        )
    if data.dataset_name is not None:
        _validate_hub_arguments(data)
        return
    if data.data_root is None:
        if (
            data.dataset != "pascal"
            or data.split
            or data.labeled_id_path
            or data.unlabeled_id_path
            or data.val_id_path
        ):
            raise ConfigError(
                "--dataset / --split / --*_id_path need --data_root (without it the synthetic dataset is used)"
            )
        return
    if not run.dry_run and not Path(data.data_root).is_dir():
        raise ConfigError(f"--data_root {data.data_root} is not a directory")
    files = split_files(data)  # raises naming the missing options
    for part, path in files.items():
        if not Path(path).is_file():
            raise ConfigError(f"--{part}_id_path: split file {path} does not exist")
    if data.dataset == "folder" and not run.dry_run:
        from ..data.sources import read_id2label

        read_id2label(data.data_root)  # raises naming id2label.json


def _validate_hub_arguments(data: DataArguments) -> None:
    from ..data.hub.partition import parse_fraction

    if data.data_root is not None:
        raise ConfigError("give --dataset_name (a `datasets` dataset) or --data_root (a local layout), not both")
    if (data.num_labeled is None) == (data.labeled_fraction is None):
        raise ConfigError("--dataset_name needs one of --num_labeled N or --labeled_fraction F (e.g. 1/16)")
    if data.num_labeled is not None:
        _positive("num_labeled", data.num_labeled)
    if data.labeled_fraction is not None:
        try:
            parse_fraction(data.labeled_fraction)
        except ValueError as error:
            raise ConfigError(f"--{error}") from None
    if data.id2label is not None and not Path(data.id2label).is_file():
        raise ConfigError(f"--id2label {data.id2label} does not exist")


def check_process_timeouts(run: RunArguments) -> None:
    """Refuse a collective or heartbeat timeout that is not a positive number of seconds (checked before the
    processes connect, since the process group is made with it)."""
    for name in ("collective_timeout_s", "heartbeat_timeout_s"):
        value = getattr(run, name)
        if not 0 < value < float("inf"):
            raise ConfigError(f"--{name} must be a positive number of seconds, got {value}")


def split_files(data: DataArguments) -> dict[str, str]:
    """``{"labeled", "unlabeled", "val": split file path}``: the given paths, else the shipped ``--split``."""
    from ..data import shipped_split_files

    given = {"labeled": data.labeled_id_path, "unlabeled": data.unlabeled_id_path, "val": data.val_id_path}
    if data.split is not None:
        try:
            shipped = shipped_split_files(data.dataset, data.split)
        except (ValueError, FileNotFoundError, KeyError) as error:
            raise ConfigError(f"--split {data.split}: {error}") from None
        given = {part: given[part] if given[part] is not None else str(shipped[part]) for part in given}
    missing = [f"--{part}_id_path" for part, path in given.items() if path is None]
    if missing:
        raise ConfigError(f"with --data_root, give --split or {' and '.join(missing)}")
    return given


# ---- resolution ---------------------------------------------------------------------------------


def default_num_workers(device_type: str, num_processes: int) -> int:
    """DataLoader workers per process when ``--num_workers`` is not given: on CUDA the CPU cores this process may
    use shared by the processes of its node (``LOCAL_WORLD_SIZE``, else all ``num_processes``), at most
    :data:`MAX_DEFAULT_WORKERS`; on other devices 0 (the model runs on those same cores)."""
    if device_type != "cuda":
        return 0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return max(1, min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)) // max(1, local_processes)))


def default_backbone_weights(backbone: str) -> str:
    """The method's initialisation, torchvision's ImageNet weights (`<backbone>.tv_in1k`), for a ResNet backbone;
    any other backbone has no default and needs ``--backbone_weights``."""
    tag = f"{backbone}.tv_in1k"
    if not timm.list_pretrained(tag):
        tags = ", ".join(timm.list_pretrained(f"{backbone}.*")[:8]) or "none in timm: a Hub repo or a local file"
        raise ConfigError(
            f"--backbone {backbone} has no default initialisation (the method's, torchvision's ImageNet weights, "
            f"exist for ResNets only): give --backbone_weights, e.g. one of timm's tags for it: {tags}; or 'none'"
        )
    return tag


def resolve_run_config(
    data: DataArguments,
    model: ModelArguments,
    run: RunArguments,
    num_processes: int = 1,
    device_type: str = "cpu",
) -> RunConfig:
    """Validate the options and fill every default once, for ``num_processes`` processes on ``device_type``.

    Warns when the initialisation departs from the method's (a random backbone on real data, DeepLabV2
    without its COCO checkpoint).
    """
    validate_arguments(data, model, run)
    hub = data.dataset_name is not None
    synthetic = data.data_root is None and not hub
    dataset = HUB if hub else SYNTHETIC if synthetic else data.dataset
    defaults = RECIPE_DEFAULTS[dataset]
    backbone = model.backbone
    if backbone is None:
        backbone = DEEPLABV2_BACKBONE if model.model == "deeplabv2" and not synthetic else defaults.backbone
    accumulation = run.gradient_accumulation_steps
    if run.per_device_batch_size is not None:
        per_device = run.per_device_batch_size
        global_batch = per_device * num_processes * accumulation
    else:
        global_batch = defaults.global_batch_size if run.global_batch_size is None else run.global_batch_size
        per_device = per_device_batch_size(global_batch, num_processes, accumulation)
    base_lr = defaults.base_lr if run.lr is None else run.lr
    output_stride = defaults.output_stride if model.output_stride is None else model.output_stride
    try:
        backbone_layout(backbone, output_stride)  # before any data work: --backbone / --output_stride can work
    except ValueError as error:
        raise ConfigError(f"--backbone {backbone} with --output_stride {output_stride}: {error}") from error
    weights = model.backbone_weights
    if weights is None:
        weights = "none" if synthetic or model.coco_init is not None else default_backbone_weights(backbone)
    if not synthetic:
        if weights == "none" and model.coco_init is None:
            warnings.warn(
                "--backbone_weights none on real data trains from a random backbone: not the method's recipe "
                f"(it starts from ImageNet weights, {backbone}.tv_in1k)",
                stacklevel=2,
            )
        if model.model == "deeplabv2" and model.coco_init is None:
            warnings.warn(
                "the paper's DeepLabV2 starts from a COCO-pretrained DeepLabV2-ResNet-101 (--coco_init FILE); "
                f"without it the backbone starts from {weights}",
                stacklevel=2,
            )
    several_cuda = num_processes > 1 and device_type == "cuda"
    sync_bn = several_cuda if run.sync_bn is None else run.sync_bn
    if sync_bn and not several_cuda:
        warnings.warn("--sync_bn needs several CUDA GPUs: off", stacklevel=2)
        sync_bn = False
    _check_batchnorm_batch(model.model, per_device, num_processes, accumulation, sync_bn)
    files = split_files(data) if data.data_root is not None else {"labeled": None, "unlabeled": None, "val": None}
    return RunConfig(
        dataset=dataset,
        data_root=None if data.data_root is None else str(Path(data.data_root).resolve()),
        split=data.split,
        labeled_id_path=files["labeled"],
        unlabeled_id_path=files["unlabeled"],
        val_id_path=files["val"],
        synthetic=_synthetic_settings(data) if synthetic else None,
        hub_dataset={f.name: getattr(data, f.name) for f in dataclasses.fields(HubDataArguments)} if hub else None,
        model=model.model,
        backbone=backbone,
        output_stride=output_stride,
        backbone_weights=weights,
        coco_init=model.coco_init,
        backbone_weights_sha256=_file_content(weights) if weights.lower().endswith(WEIGHT_FILE_SUFFIXES) else None,
        coco_init_sha256=None if model.coco_init is None else _file_content(model.coco_init),
        framework=run.framework,
        teacher=run.teacher,
        epochs=defaults.epochs if run.epochs is None else run.epochs,
        global_batch_size=global_batch,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_processes=num_processes,
        base_lr=base_lr,
        lr=scaled_lr(base_lr, global_batch),
        crop_size=defaults.crop_size if run.crop_size is None else run.crop_size,
        base_size=defaults.base_size if run.base_size is None else run.base_size,
        val_batch_size=defaults.val_batch_size if run.val_batch_size is None else run.val_batch_size,
        inference_batch_size=run.inference_batch_size,
        sliding_window=run.sliding_window,
        mixed_precision=run.mixed_precision,
        allow_emulated_precision=run.allow_emulated_precision,
        sync_bn=sync_bn,
        channels_last=device_type == "cuda" if run.channels_last is None else run.channels_last,
        activation_checkpointing=run.activation_checkpointing,
        seed=run.seed,
        num_workers=default_num_workers(device_type, num_processes) if data.num_workers is None else data.num_workers,
        save_steps=run.save_steps,
        output_dir=run.output_dir,
        report_to=run.report_to,
        push_to_hub=run.push_to_hub,
        hub_model_id=run.hub_model_id,
        hub_private=run.hub_private,
        push_stage_branches=run.push_stage_branches,
        dry_run=run.dry_run,
        redo_stage=run.redo_stage,
        label_next=run.label_next,
    )


def _file_content(path: str) -> Optional[str]:
    """SHA-256 of the initialisation file at ``path`` (``None`` if it does not exist: the option's own check
    names it where the file is read)."""
    path = os.path.expanduser(path)
    return sha256_file(path) if os.path.isfile(path) else None


def _check_batchnorm_batch(model: str, per_device: int, num_processes: int, accumulation: int, sync_bn: bool) -> None:
    """Refuse a batch that DeepLabV3+'s image-pooling BatchNorm cannot train on: it normalises a ``[batch, 256, 1, 1]``
    map, so it needs at least two values per channel, i.e. two images per device, or SyncBatchNorm over several
    CUDA GPUs (DeepLabV2 has BatchNorm on spatial maps only)."""
    batchnorm_batch = per_device * (num_processes if sync_bn else 1)
    if model != "deeplabv3plus" or batchnorm_batch >= 2:
        return
    raise ConfigError(
        f"--per_device_batch_size 1 (global batch {per_device * num_processes * accumulation} = 1 per device x "
        f"{num_processes} processes x {accumulation} --gradient_accumulation_steps) leaves DeepLabV3+'s ASPP "
        "image-pooling BatchNorm one value per channel, which BatchNorm cannot train on. Give each device at least 2 "
        "images: --per_device_batch_size 2, or a --global_batch_size that is at least 2 x processes x accumulation "
        "steps, or fewer --gradient_accumulation_steps (e.g. one GPU, global batch 16: --gradient_accumulation_steps 8"
        "); or use SyncBatchNorm over several CUDA GPUs (--sync_bn, on by default there), or --model deeplabv2"
    )


def _synthetic_settings(data: DataArguments) -> dict:
    """The :func:`~stpp_hf.data.make_synthetic_dataset` keyword arguments of the options."""
    return {
        "seed": data.synthetic_seed,
        "num_labeled": data.synthetic_num_labeled,
        "num_unlabeled": data.synthetic_num_unlabeled,
        "num_val": data.synthetic_num_val,
        "image_size": data.synthetic_image_size,
    }


# ---- the record of a run directory --------------------------------------------------------------


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(setting, saved value, new value)]`` of the result-changing settings that differ, nested keys
    dotted (``data.val``). A top-level section that only one side has yet (``data``, known once the
    sources are built) is not compared; :data:`NON_RESULT_SETTINGS` never are, nor the
    :data:`BATCH_LAYOUT_SETTINGS` while the global batch and lr are the same, nor :data:`ADDED_SETTINGS` that
    ``saved`` lacks."""
    saved, new = json.loads(json.dumps(dict(saved))), json.loads(json.dumps(dict(new)))  # tuples as on disk
    for section in set(saved) ^ set(new):
        if isinstance(saved.get(section, new.get(section)), dict):
            saved.pop(section, None), new.pop(section, None)
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    missing = object()
    differences = []
    same_batch = all(flat_saved.get(key, missing) == flat_new.get(key, missing) for key in BATCH_SETTINGS)
    for key in sorted(set(flat_saved) | set(flat_new)):
        if key.split(".")[0] in NON_RESULT_SETTINGS or (same_batch and key in BATCH_LAYOUT_SETTINGS):
            continue
        if key in ADDED_SETTINGS and key not in flat_saved:
            continue
        before, after = flat_saved.get(key, missing), flat_new.get(key, missing)
        if before != after:
            differences.append((key, None if before is missing else before, None if after is missing else after))
    return differences


def check_same_config(run_dir: str | os.PathLike, saved: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Raise a :class:`ConfigError` listing every differing setting (saved -> new) of ``run_dir``."""
    differences = config_differences(saved, new)
    if differences:
        details = "\n".join(
            f"  {key}: {before!r} -> {after!r}" + _what_changed(key, new) for key, before, after in differences
        )
        raise ConfigError(
            f"{run_dir} already holds a run with other settings (saved -> new):\n{details}\n"
            "use another --output_dir, or the saved settings to resume"
        )


def _what_changed(key: str, new: Mapping[str, Any]) -> str:
    """What a differing setting means, where its name alone does not say."""
    if key in ADDED_SETTINGS:
        option = ADDED_SETTINGS[key]
        return f" (the file {new.get(option.removeprefix('--'))} given as {option} has other content than the run's)"
    return ""


def batch_layout_change(saved: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """A warning when the same global batch is laid out otherwise on the hardware (processes, per-device batch,
    accumulation, SyncBatchNorm) than in ``saved``; ``None`` when the layout is the same."""
    if all(saved.get(key) == new.get(key) for key in BATCH_LAYOUT_SETTINGS):
        return None

    def layout(config: Mapping[str, Any]) -> str:
        across = config.get("num_processes", 1) if config.get("sync_bn") else 1
        bn_batch = config.get("per_device_batch_size", 0) * across
        return (
            f"{config.get('per_device_batch_size')} per device x {config.get('num_processes')} processes x "
            f"{config.get('gradient_accumulation_steps')} accumulation steps, BatchNorm batch {bn_batch}"
            + (" (SyncBatchNorm)" if config.get("sync_bn") else "")
        )

    return (
        f"the global batch of {new.get('global_batch_size')} was {layout(saved)} and is now {layout(new)}: the steps "
        "and lr are the same, but BatchNorm normalises over the BatchNorm batch and keeps its running statistics "
        "per process, so the run continues with BatchNorm statistics that differ from an uninterrupted run's"
    )


def check_and_record_run_config(run_dir: str | os.PathLike, record: Mapping[str, Any], write: bool = True) -> None:
    """Compare ``record`` with the run directory's ``run_config.json`` (if any), then (``write``) write it there.

    Call it before anything in ``run_dir`` is made or replaced (with the settings only), and again once
    the sources are built (with their ``data`` section). A run directory from an older version, with
    ``state.json`` but no ``run_config.json``, cannot be checked and is refused.
    """
    layout = RunLayout(run_dir)
    run_dir, path = layout.run_dir, layout.run_config
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}); restore it or use another --output_dir") from None
        check_same_config(run_dir, saved, record)
        if write and (change := batch_layout_change(saved, record)):
            logger.warning("%s: %s", run_dir, change)
        merged = {**saved, **record}  # keep the data section of the first check until the second one
    elif layout.state.is_file():
        raise ConfigError(f"{run_dir} holds a run without {path.name} (an older version): use another --output_dir")
    else:
        saved, merged = None, dict(record)
    if write and json.loads(json.dumps(merged)) != saved:  # an unchanged record is not rewritten
        atomic_write_json(path, merged)


def describe_stages(config: RunConfig) -> list[str]:
    """One line per stage: what it trains on / labels and with which teacher."""
    lines = []
    for stage in build_stages(config.framework):
        if stage.kind == "train":
            data = " + ".join(["labeled", *(f"pseudo labels of {name}" for name in stage.pseudo_label_stages)])
            lines.append(f"{stage.name}: train a fresh model on {data}")
        elif stage.kind == "select":
            lines.append(f"{stage.name}: reliable / unreliable halves from the snapshots of {stage.source}")
        else:
            lines.append(
                f"{stage.name}: TTA pseudo labels of the {stage.subset} unlabeled images "
                f"by {stage.source}'s {config.teacher} model"
            )
    return lines
