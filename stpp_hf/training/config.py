"""The resolved configuration of a run: the options checked against each other (:func:`validate_arguments`) and
filled with their defaults once (:func:`resolve_run_config`): those of the dataset in
:data:`~stpp_hf.training.recipe.RECIPE_DEFAULTS`, of the device and of the number of processes. The result is the
three option dataclasses of :mod:`~stpp_hf.training.options` with every default filled in, plus the few facts that
follow from them (:class:`Derived`), as one :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm

from ..file_io import sha256_file
from ..models.backbone_weights import WEIGHT_FILE_SUFFIXES
from ..models.deeplab.deeplab_common import default_window_stride
from ..models.deeplab.timm_backbones import backbone_layout
from .errors import ConfigError
from .options import (
    ARGUMENT_CLASSES,
    PRECISIONS,
    DataArguments,
    ModelArguments,
    RunArguments,
    check_fields,
)
from .recipe import DEEPLABV2_BACKBONE, HUB, RECIPE_DEFAULTS, SYNTHETIC, per_device_batch_size, scaled_lr
from .run_record import settings_record
from .stages import build_stages, snapshot_epochs

__all__ = ["Derived", "RunConfig", "resolve_options", "resolve_run_config", "validate_arguments"]

# DataLoader workers per process by default on CUDA: decoding keeps a GPU busy with a few, more only cost memory
MAX_DEFAULT_WORKERS = 8


def data_kind(data: DataArguments) -> str:
    """The kind of data: ``"hub"`` (``--dataset_name``), ``"synthetic"`` (no ``--data_root``) or the ``--dataset``
    layout of a ``--data_root``."""
    if data.dataset_name is not None:
        return HUB
    return SYNTHETIC if data.data_root is None else data.dataset


@dataclass(frozen=True)
class Derived:
    """What follows from the options and the launch, besides their defaults."""

    num_processes: int
    scaled_lr: float  # --lr / 16 x global batch: the backbone group's peak lr
    backbone_weights_sha256: Optional[str]  # the content of a --backbone_weights FILE (a Hub tag names its own)
    coco_init_sha256: Optional[str]


@dataclass(frozen=True)
class RunConfig:
    """The options of a run with every default filled in (``None`` only where an option does not apply) and what
    follows from them. ``run.per_device_batch_size * derived.num_processes * run.gradient_accumulation_steps ==
    run.global_batch_size``; ``run.lr`` is the base lr for a global batch of 16, ``derived.scaled_lr`` the one used."""

    data: DataArguments
    model: ModelArguments
    run: RunArguments
    derived: Derived

    @property
    def data_kind(self) -> str:
        return data_kind(self.data)

    @property
    def is_hub(self) -> bool:
        return self.data_kind == HUB

    @property
    def is_synthetic(self) -> bool:
        return self.data_kind == SYNTHETIC

    @property
    def sliding_window_stride(self) -> Optional[tuple[int, int]]:
        """``(window, stride)`` of sliding-window evaluation (stride 2/3 of the window), or ``None``."""
        window = self.run.sliding_window
        return None if window is None else (window, default_window_stride(window))

    def record(self) -> dict:
        """The settings of ``run_config.json`` (:func:`~stpp_hf.training.run_record.settings_record`)."""
        return settings_record(self)


# ---- validation ---------------------------------------------------------------------------------


def validate_arguments(data: DataArguments, model: ModelArguments, run: RunArguments) -> None:
    """Check the options against each other (each option alone is checked when its dataclass is made:
    :func:`~stpp_hf.training.options.check_fields`); no data is read besides the existence of the files named.
    Raises :class:`ConfigError` naming the options."""
    for arguments in (data, model, run):
        check_fields(arguments)  # again: a field may have been set after the dataclass was made
    if run.global_batch_size is not None and run.per_device_batch_size is not None:
        raise ConfigError("give --global_batch_size or --per_device_batch_size, not both")
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
            data.dataset not in ("pascal", None)  # None: resolved, the layout does not apply
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
    if data.dataset is None:
        raise ConfigError("--dataset: name the layout of --data_root (pascal, cityscapes or folder)")
    files = split_files(data)  # raises naming the missing options
    for part, path in files.items():
        if not Path(path).is_file():
            raise ConfigError(f"--{part}_id_path: split file {path} does not exist")
    if data.dataset == "folder" and not run.dry_run:
        from ..data.sources import read_id2label

        read_id2label(data.data_root)  # raises naming id2label.json


def _validate_hub_arguments(data: DataArguments) -> None:
    if data.data_root is not None:
        raise ConfigError("give --dataset_name (a `datasets` dataset) or --data_root (a local layout), not both")
    if (data.num_labeled is None) == (data.labeled_fraction is None):
        raise ConfigError("--dataset_name needs one of --num_labeled N or --labeled_fraction F (e.g. 1/16)")
    if data.id2label is not None and not Path(data.id2label).is_file():
        raise ConfigError(f"--id2label {data.id2label} does not exist")


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
    kind = data_kind(data)
    synthetic = kind == SYNTHETIC
    defaults = RECIPE_DEFAULTS[kind]
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
        data=dataclasses.replace(
            data,
            dataset=None if data.data_root is None else data.dataset,  # a layout applies to a --data_root only
            data_root=None if data.data_root is None else str(Path(data.data_root).resolve()),
            labeled_id_path=files["labeled"],
            unlabeled_id_path=files["unlabeled"],
            val_id_path=files["val"],
            num_workers=default_num_workers(device_type, num_processes)
            if data.num_workers is None
            else data.num_workers,
        ),
        model=dataclasses.replace(model, backbone=backbone, output_stride=output_stride, backbone_weights=weights),
        run=dataclasses.replace(
            run,
            epochs=defaults.epochs if run.epochs is None else run.epochs,
            global_batch_size=global_batch,
            per_device_batch_size=per_device,
            lr=base_lr,
            crop_size=defaults.crop_size if run.crop_size is None else run.crop_size,
            base_size=defaults.base_size if run.base_size is None else run.base_size,
            val_batch_size=defaults.val_batch_size if run.val_batch_size is None else run.val_batch_size,
            sync_bn=sync_bn,
            channels_last=device_type == "cuda" if run.channels_last is None else run.channels_last,
            mixed_precision=launch_precision(run),
        ),
        derived=Derived(
            num_processes=num_processes,
            scaled_lr=scaled_lr(base_lr, global_batch),
            backbone_weights_sha256=_file_content(weights) if weights.lower().endswith(WEIGHT_FILE_SUFFIXES) else None,
            coco_init_sha256=None if model.coco_init is None else _file_content(model.coco_init),
        ),
    )


def resolve_options(num_processes: int = 1, device_type: str = "cpu", **options) -> RunConfig:
    """:func:`resolve_run_config` of options given by their command-line names (e.g. ``epochs=1, lr=0.01``), to run
    :func:`~stpp_hf.training.trainer.train_stage` or the pipeline from Python; an unknown name is a
    :class:`ConfigError`."""
    arguments = []
    for cls in ARGUMENT_CLASSES:
        names = {option.name for option in dataclasses.fields(cls)}
        arguments.append(cls(**{name: options.pop(name) for name in list(options) if name in names}))
    if options:
        raise ConfigError(f"unknown options {', '.join(sorted(options))}; see stpp-train --help")
    return resolve_run_config(*arguments, num_processes=num_processes, device_type=device_type)


# what `accelerate launch --mixed_precision` and the accelerate config set for the script
LAUNCHER_PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"


def launch_precision(run: RunArguments) -> str:
    """``--mixed_precision``, else the launcher's (``accelerate launch --mixed_precision`` and the accelerate config
    set ``ACCELERATE_MIXED_PRECISION``), else ``no``: the script's default does not override the launcher."""
    if run.mixed_precision is not None:
        return run.mixed_precision
    launched = os.environ.get(LAUNCHER_PRECISION_VARIABLE, "no").lower()
    if launched not in PRECISIONS:
        raise ConfigError(
            f"{LAUNCHER_PRECISION_VARIABLE}={launched} (from accelerate launch / the accelerate config) is not a "
            f"precision stpp-train runs: use one of {', '.join(PRECISIONS)}, e.g. --mixed_precision no"
        )
    return launched


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
