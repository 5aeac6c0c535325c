"""``stpp-train`` (and ``examples/train_stpp.py``): SupOnly / ST / ST++ end to end with Accelerate.

    accelerate launch -m stpp_hf.training.cli --output_dir runs/demo                  # synthetic data, ST++
    stpp-train examples/recipes/pascal-1_16-r50.yaml --data_root VOCdevkit/VOC2012    # a paper recipe
    stpp-train examples/recipes/pascal-1_16-r50.yaml --data_root VOC2012 --dry_run    # print it, train nothing

Relaunching the same command in the same ``--output_dir`` resumes the run; a relaunch with settings or
data that differ from the saved ``run_config.json`` is refused before anything in the run directory changes.
SIGTERM / SIGINT / SIGUSR1 stop it after saving what the relaunch resumes from, with exit code
:data:`~stpp_hf.training.preemption.PREEMPTED_EXIT_CODE` (docs/preemption.md).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

from ..convert_original import load_coco_init
from ..data import read_split
from ..data.training_sets import retrain_length, suponly_length
from ..models import MODEL_REGISTRY, DeepLabImageProcessor, build_model
from ..models.backbone_weights import describe_backbone_weights, load_backbone_weights
from .config import (
    ConfigError,
    RunConfig,
    check_and_record_run_config,
    check_process_timeouts,
    describe_stages,
    parse_arguments,
    resolve_run_config,
)
from .data_identity import check_hub_data, check_local_data, identify_local_data, local_data
from .distributed import check_shared_run_dir, create_accelerator
from .divergence import NonFiniteError
from .heartbeat import start_heartbeat
from .pipeline import RunSettings, lock_run, run_pipeline
from .precision import gather_precision_decision
from .preemption import PREEMPTED_EXIT_CODE, Preempted, exit_with_launcher, stop_handlers
from .pseudo_label_export import record_unlabeled_source
from .recipe import REFERENCE_BATCH_SIZE, describe_optimizer, steps_per_epoch
from .results import results_table
from .run_data import build_run_data
from .run_layout import RunLayout
from .selection import split_by_reliability
from .stages import build_stages, snapshot_epochs
from .trainer import StageHyperParameters

# ---- the recipe, without data ----------------------------------------------------------------------


def dataset_sizes(config: RunConfig) -> dict[str, int] | None:
    """``{"labeled", "unlabeled", "val": number of images}`` from the split files' lines (no image is read);
    ``None`` for a ``--dataset_name`` run, whose sizes are known once the dataset is loaded."""
    if config.hub_dataset is not None:
        return None
    if config.is_synthetic:
        return {part: config.synthetic[f"num_{part}"] for part in ("labeled", "unlabeled", "val")}
    paths = {"labeled": config.labeled_id_path, "unlabeled": config.unlabeled_id_path, "val": config.val_id_path}
    return {part: len(read_split(path)) for part, path in paths.items()}


def stage_steps(config: RunConfig, sizes: dict[str, int]) -> dict[str, int]:
    """Optimizer steps per epoch of each training stage, from the dataset sizes."""
    unlabeled = [str(index) for index in range(sizes["unlabeled"])]
    reliable, unreliable = split_by_reliability(dict.fromkeys(unlabeled, 0.0), unlabeled)
    subset_size = {"all": len(unlabeled), "reliable": len(reliable), "unreliable": len(unreliable)}
    stages = build_stages(config.framework)
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
        steps[stage.name] = steps_per_epoch(items, config.global_batch_size)
    return steps


def recipe_summary(config: RunConfig) -> dict:
    """The numbers of the resolved recipe: batches, lr of each parameter group, steps, snapshots."""
    sizes = dataset_sizes(config)
    head_multiplier = MODEL_REGISTRY[config.model][0]().head_lr_multiplier
    per_stage = stage_steps(config, sizes) if sizes is not None else {}
    return {
        "dataset_sizes": sizes,
        "global_batch_size": config.global_batch_size,
        "per_device_batch_size": config.per_device_batch_size,
        "lr": {"backbone": config.lr, "head": config.lr * head_multiplier},
        "steps_per_epoch": per_stage,
        "steps": {name: steps * config.epochs for name, steps in per_stage.items()},
        "total_steps": sum(per_stage.values()) * config.epochs if sizes is not None else None,
        "snapshot_epochs": list(snapshot_epochs(config.epochs)) if config.framework == "stpp" else [],
    }


def describe_initialisation(config: RunConfig) -> str:
    """Where the weights a training stage starts from come from."""
    if config.coco_init is not None:
        return f"COCO-pretrained DeepLabV2 checkpoint {config.coco_init} (the paper's)"
    if config.backbone_weights == "none":
        return "none (random backbone)"
    described = describe_backbone_weights(config.backbone_weights, config.backbone)
    where = {"hub": f"Hub {described.get('hub_id')}", "file": f"file {described.get('path')}", "none": "random init"}
    return f"{config.backbone_weights} ({where.get(described['kind'], described['kind'])})"


def describe_recipe(config: RunConfig, paper: Optional[dict] = None) -> str:
    """The printed ``--dry_run`` recipe."""
    summary = recipe_summary(config)
    sizes = summary["dataset_sizes"]
    if config.hub_dataset is not None:
        hub = config.hub_dataset
        labeled = hub["num_labeled"] if hub["num_labeled"] is not None else f"a fraction {hub['labeled_fraction']} of"
        data_line = (
            f"dataset: {hub['dataset_name']} (`datasets`), {labeled} {hub['train_split']} rows labeled "
            f"(partition seed {hub['partition_seed']}), val split {hub['val_split']}; image counts once it is loaded"
        )
    else:
        data_line = (
            f"dataset: {config.dataset} ({config.data_root or 'generated in the run directory'}), split "
            f"{config.split or '-'}: {sizes['labeled']} labeled, {sizes['unlabeled']} unlabeled, "
            f"{sizes['val']} val images"
        )
    if sizes is not None:
        steps_line = (
            f"epochs per stage: {config.epochs}; steps per epoch / per stage: "
            + ", ".join(
                f"{name} {summary['steps_per_epoch'][name]} / {summary['steps'][name]}" for name in summary["steps"]
            )
            + f"; total {summary['total_steps']}"
        )
    else:
        steps_line = f"epochs per stage: {config.epochs}; steps follow from the image counts"
    lines = [
        data_line,
        f"model: {config.model}, backbone {config.backbone}, output stride {config.output_stride}",
        f"initialisation: {describe_initialisation(config)}",
        f"framework: {config.framework}, teacher: the {config.teacher} model of its stage",
        *(f"  {line}" for line in describe_stages(config)),
        f"global batch: {config.global_batch_size} = {config.per_device_batch_size} per device x "
        f"{config.num_processes} processes x {config.gradient_accumulation_steps} accumulation steps",
        f"lr: base {config.base_lr:g} for a global batch of {REFERENCE_BATCH_SIZE} -> backbone "
        f"{summary['lr']['backbone']:g}, head {summary['lr']['head']:g} ({describe_optimizer()})",
        steps_line,
    ]
    if summary["snapshot_epochs"]:
        lines.append(f"snapshot epochs (selection): {', '.join(map(str, summary['snapshot_epochs']))}")
    window = config.sliding_window_stride
    lines += [
        f"crop {config.crop_size}, resize base {config.base_size}; val batch {config.val_batch_size}"
        + (f", sliding window {window[0]} stride {window[1]}" if window else ", whole images"),
        f"precision {config.mixed_precision}, SyncBatchNorm {'on' if config.sync_bn else 'off'}, "
        f"activation checkpointing {'on' if config.activation_checkpointing else 'off'}, seed {config.seed}",
    ]
    if paper:
        published = paper.get("published_miou")
        lines.append(
            f"paper: {paper.get('table', '')} published mIoU "
            + (f"{published}" if published is not None else "not stated in this recipe")
            + (f" ({paper['note']})" if paper.get("note") else "")
        )
    return "\n".join(lines)


# ---- data and model -------------------------------------------------------------------------------


def model_factory(config: RunConfig, id2label: dict[int, str]):
    """A fresh model of the recipe with its initial weights, once per training stage."""
    config_kwargs = dict(
        backbone=config.backbone, output_stride=config.output_stride, num_labels=len(id2label), id2label=id2label
    )

    def factory():
        model = build_model(config.model, **config_kwargs)
        if config.coco_init is not None:
            load_coco_init(model, config.coco_init)
        elif config.backbone_weights != "none":
            load_backbone_weights(model, config.backbone_weights)
        return model

    return factory


def _check_run_dir(
    accelerator, output_dir: Path, record: dict, check=check_and_record_run_config, write: bool = True
) -> None:
    """Every process compares ``record`` with the saved one (``check``); then (``write``) the main process records
    it."""
    check(output_dir, record, write=False)
    accelerator.wait_for_everyone()
    if write and accelerator.is_main_process:
        check(output_dir, record, write=True)
    accelerator.wait_for_everyone()


# ---- main -----------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), then print the recipe (``--dry_run``) or train; returns 0."""
    data_args, model_args, run_args, paper = parse_arguments(argv)

    import transformers
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    check_process_timeouts(run_args)  # the process group is made with them

    output_dir = Path(run_args.output_dir)
    layout = RunLayout(output_dir)
    accelerator = create_accelerator(
        mixed_precision=run_args.mixed_precision,
        gradient_accumulation_steps=run_args.gradient_accumulation_steps,
        log_with=None if run_args.report_to == "none" or run_args.dry_run else run_args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(layout.logs)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=run_args.collective_timeout_s))],
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    transformers.utils.logging.disable_progress_bar()  # per-shard bars on every save / load
    # validates every option: a bad one fails here, before any data work
    config = resolve_run_config(data_args, model_args, run_args, accelerator.num_processes, accelerator.device.type)
    # the precision must suit the device of every process, known before any data work or run directory
    precision = gather_precision_decision(accelerator, config.allow_emulated_precision)
    if config.dry_run:
        if accelerator.is_main_process:
            print(describe_recipe(config, paper))
            print("\n".join(precision.describe()))
        return 0
    precision.check()

    # before anything is written there: all processes see one run directory, one launch at a time holds it,
    # and the settings are those of the run it holds (the data is compared once built)
    check_shared_run_dir(accelerator, output_dir)
    lock_run(accelerator, output_dir)
    # from here a process that stops answering ends the run (a process that raises stops beating too)
    heartbeat = start_heartbeat(accelerator, layout.heartbeats, run_args.heartbeat_timeout_s)
    # the settings are recorded now in a new run directory only: a relaunch records them once the data matches too
    _check_run_dir(accelerator, output_dir, config.to_dict(), write=not layout.run_config.is_file())
    # local data is compared by content before any cache is built: a refused launch changes nothing
    local = None if config.hub_dataset is not None else local_data(config, output_dir, accelerator)
    if local is not None:
        data_section, file_hashes = identify_local_data(local, output_dir, accelerator)

        def check_data(run_dir, section, write):
            check_local_data(run_dir, local, section, file_hashes, write)

        _check_run_dir(accelerator, output_dir, data_section, check=check_data)
        _check_run_dir(accelerator, output_dir, {**config.to_dict(), "data": data_section})
    data, sources = build_run_data(config, output_dir, accelerator, local, data_section if local is not None else None)
    if local is None:
        _check_run_dir(accelerator, output_dir, sources.identity, check=check_hub_data)
    record = {**config.to_dict(), "data": sources.identity}
    _check_run_dir(accelerator, output_dir, record)
    if accelerator.is_main_process:
        if local is not None:
            file_hashes.save()
        record_unlabeled_source(output_dir, sources.unlabeled_source)  # for exporting the pseudo labels with images

    metadata = {
        "dataset": config.dataset,
        "split": config.split or ("synthetic" if config.is_synthetic else "custom"),
        "model": config.model,
        "backbone": config.backbone,
        "output_stride": config.output_stride,
        "epochs": config.epochs,
        "batch_size": config.global_batch_size,
        "lr": config.base_lr,
        "crop_size": config.crop_size,
        "pretrained_backbone": config.backbone_weights != "none" or config.coco_init is not None,
        "backbone_weights": describe_backbone_weights(config.backbone_weights, config.backbone),
        "precision": precision.to_json(),
        **sources.metadata,
    }
    hparams = StageHyperParameters(
        epochs=config.epochs,
        global_batch_size=config.global_batch_size,
        base_lr=config.base_lr,
        val_batch_size=config.val_batch_size,
        num_workers=config.num_workers,
        seed=config.seed,
        sliding_window=config.sliding_window_stride,
        channels_last=config.channels_last,
        activation_checkpointing=config.activation_checkpointing,
        sync_batchnorm=config.sync_bn,
        save_steps=config.save_steps,
    )
    settings = RunSettings(
        run_dir=output_dir,
        framework=config.framework,
        hparams=hparams,
        model_factory=model_factory(config, data.id2label),
        model_class=MODEL_REGISTRY[config.model][1],
        image_processor=DeepLabImageProcessor(),
        teacher=config.teacher,
        inference_batch_size=config.inference_batch_size,
        metadata=metadata,
        run_config=record,
        redo_stage=config.redo_stage,
        label_next=config.label_next,
    )
    if config.report_to != "none":
        # TensorBoard's hparams accept only scalars and strings
        scalars = {key: value for key, value in config.to_dict().items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("stpp", config=scalars)
    results = run_pipeline(accelerator, data, settings)
    if heartbeat is not None:  # every process is here: the main process may push alone from now on
        heartbeat.stop()
    accelerator.end_training()
    if accelerator.is_main_process:
        print(results_table(results))
        print(f"run directory: {output_dir} (final model in {layout.final})")
        if config.push_to_hub:
            from stpp_hf.hub import push_run_to_hub

            url = push_run_to_hub(
                output_dir, config.hub_model_id, private=config.hub_private, push_stages=config.push_stage_branches
            )
            print(f"pushed to {url}")
    return 0


def console_main() -> None:
    """The ``stpp-train`` console script: a bad option or a diverged training is one line that names it, not a
    traceback; a stop signal saves, prints one line and exits with :data:`PREEMPTED_EXIT_CODE`."""
    exit_with_launcher()
    try:
        with stop_handlers():
            sys.exit(main())
    except (ConfigError, NonFiniteError) as error:
        sys.exit(f"stpp-train: error: {error}")
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":  # one line for the run, not one per process
            print(
                f"stpp-train: {stop}; relaunch the same command to resume (exit code {PREEMPTED_EXIT_CODE})",
                flush=True,
            )
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    console_main()
