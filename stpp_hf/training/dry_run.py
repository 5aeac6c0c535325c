"""The ``--dry_run`` description of a resolved recipe, without reading any image: the dataset sizes from the split
files, the steps of each stage, the lr of each parameter group, the initialisation and the stages."""

from __future__ import annotations

from typing import Optional

from ..data import read_split
from ..data.training_sets import retrain_length, suponly_length
from ..models import MODEL_REGISTRY
from ..models.backbone_weights import describe_backbone_weights
from .config import RunConfig
from .recipe import REFERENCE_BATCH_SIZE, describe_optimizer, steps_per_epoch
from .selection import split_by_reliability
from .stages import build_stages, snapshot_epochs


def dataset_sizes(config: RunConfig) -> dict[str, int] | None:
    """``{"labeled", "unlabeled", "val": number of images}`` from the split files' lines (no image is read);
    ``None`` for a ``--dataset_name`` run, whose sizes are known once the dataset is loaded."""
    if config.is_hub:
        return None
    if config.is_synthetic:
        return {part: getattr(config.data, f"synthetic_num_{part}") for part in ("labeled", "unlabeled", "val")}
    paths = {
        "labeled": config.data.labeled_id_path,
        "unlabeled": config.data.unlabeled_id_path,
        "val": config.data.val_id_path,
    }
    return {part: len(read_split(path)) for part, path in paths.items()}


def stage_steps(config: RunConfig, sizes: dict[str, int]) -> dict[str, int]:
    """Optimizer steps per epoch of each training stage, from the dataset sizes."""
    unlabeled = [str(index) for index in range(sizes["unlabeled"])]
    reliable, unreliable = split_by_reliability(dict.fromkeys(unlabeled, 0.0), unlabeled)
    subset_size = {"all": len(unlabeled), "reliable": len(reliable), "unreliable": len(unreliable)}
    stages = build_stages(config.run.framework)
    subset_of = {stage.name: stage.subset for stage in stages if stage.kind == "label"}
    steps = {}
    for stage in stages:
        if stage.kind != "train":
            continue
        if stage.pseudo_label_stages:
            pseudo = sum(subset_size[subset_of[name]] for name in stage.pseudo_label_stages)
            items = retrain_length(sizes["labeled"], pseudo)
        else:
            items = suponly_length(sizes["labeled"])
        steps[stage.name] = steps_per_epoch(items, config.run.global_batch_size)
    return steps


def recipe_summary(config: RunConfig) -> dict:
    """The numbers of the resolved recipe: batches, lr of each parameter group, steps, snapshots."""
    sizes = dataset_sizes(config)
    head_multiplier = MODEL_REGISTRY[config.model.model][0]().head_lr_multiplier
    per_stage = stage_steps(config, sizes) if sizes is not None else {}
    return {
        "dataset_sizes": sizes,
        "global_batch_size": config.run.global_batch_size,
        "per_device_batch_size": config.run.per_device_batch_size,
        "lr": {"backbone": config.derived.scaled_lr, "head": config.derived.scaled_lr * head_multiplier},
        "steps_per_epoch": per_stage,
        "steps": {name: steps * config.run.epochs for name, steps in per_stage.items()},
        "total_steps": sum(per_stage.values()) * config.run.epochs if sizes is not None else None,
        "snapshot_epochs": list(snapshot_epochs(config.run.epochs)) if config.run.framework == "stpp" else [],
    }


def describe_initialisation(config: RunConfig) -> str:
    """Where the weights a training stage starts from come from."""
    if config.model.coco_init is not None:
        return f"COCO-pretrained DeepLabV2 checkpoint {config.model.coco_init} (the paper's)"
    if config.model.backbone_weights == "none":
        return "none (random backbone)"
    described = describe_backbone_weights(config.model.backbone_weights, config.model.backbone)
    where = {"hub": f"Hub {described.get('hub_id')}", "file": f"file {described.get('path')}", "none": "random init"}
    return f"{config.model.backbone_weights} ({where.get(described['kind'], described['kind'])})"


def describe_recipe(config: RunConfig, paper: Optional[dict] = None) -> str:
    """The printed ``--dry_run`` recipe."""
    summary = recipe_summary(config)
    sizes = summary["dataset_sizes"]
    if config.is_hub:
        hub = config.data
        labeled = hub.num_labeled if hub.num_labeled is not None else f"a fraction {hub.labeled_fraction} of"
        data_line = (
            f"dataset: {hub.dataset_name} (`datasets`), {labeled} {hub.train_split} rows labeled "
            f"(partition seed {hub.partition_seed}), val split {hub.val_split}; image counts once it is loaded"
        )
    else:
        data_line = (
            f"dataset: {config.data_kind} ({config.data.data_root or 'generated in the run directory'}), split "
            f"{config.data.split or '-'}: {sizes['labeled']} labeled, {sizes['unlabeled']} unlabeled, "
            f"{sizes['val']} val images"
        )
    if sizes is not None:
        steps_line = (
            f"epochs per stage: {config.run.epochs}; steps per epoch / per stage: "
            + ", ".join(
                f"{name} {summary['steps_per_epoch'][name]} / {summary['steps'][name]}" for name in summary["steps"]
            )
            + f"; total {summary['total_steps']}"
        )
    else:
        steps_line = f"epochs per stage: {config.run.epochs}; steps follow from the image counts"
    lines = [
        data_line,
        f"model: {config.model.model}, backbone {config.model.backbone}, output stride {config.model.output_stride}",
        f"initialisation: {describe_initialisation(config)}",
        f"framework: {config.run.framework}, teacher: the {config.run.teacher} model of its stage",
        *(f"  {line}" for line in describe_stages(config)),
        f"global batch: {config.run.global_batch_size} = {config.run.per_device_batch_size} per device x "
        f"{config.derived.num_processes} processes x {config.run.gradient_accumulation_steps} accumulation steps",
        f"lr: base {config.run.lr:g} for a global batch of {REFERENCE_BATCH_SIZE} -> backbone "
        f"{summary['lr']['backbone']:g}, head {summary['lr']['head']:g} ({describe_optimizer()})",
        steps_line,
    ]
    if summary["snapshot_epochs"]:
        lines.append(f"snapshot epochs (selection): {', '.join(map(str, summary['snapshot_epochs']))}")
    window = config.sliding_window_stride
    lines += [
        f"crop {config.run.crop_size}, resize base {config.run.base_size}; val batch {config.run.val_batch_size}"
        + (f", sliding window {window[0]} stride {window[1]}" if window else ", whole images"),
        f"precision {config.run.mixed_precision}, SyncBatchNorm {'on' if config.run.sync_bn else 'off'}, "
        f"activation checkpointing {'on' if config.run.activation_checkpointing else 'off'}, seed {config.run.seed}",
    ]
    if paper:
        published = paper.get("published_miou")
        lines.append(
            f"paper: {paper.get('table', '')} published mIoU "
            + (f"{published}" if published is not None else "not stated in this recipe")
            + (f" ({paper['note']})" if paper.get("note") else "")
        )
    return "\n".join(lines)


def describe_stages(config: RunConfig) -> list[str]:
    """One line per stage: what it trains on / labels and with which teacher."""
    lines = []
    for stage in build_stages(config.run.framework):
        if stage.kind == "train":
            data = " + ".join(["labeled", *(f"pseudo labels of {name}" for name in stage.pseudo_label_stages)])
            lines.append(f"{stage.name}: train a fresh model on {data}")
        elif stage.kind == "select":
            lines.append(f"{stage.name}: reliable / unreliable halves from the snapshots of {stage.source}")
        else:
            lines.append(
                f"{stage.name}: TTA pseudo labels of the {stage.subset} unlabeled images "
                f"by {stage.source}'s {config.run.teacher} model"
            )
    return lines
