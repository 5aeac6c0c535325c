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
from pathlib import Path
from typing import Optional

from ..convert_original import load_coco_init
from ..data import (
    check_label_file_names,
    check_split_overlap,
    load_source,
    make_synthetic_dataset,
    read_split,
)
from ..data.hub_dataset import HubDataArguments, hub_split_name, load_hub_run_sources
from ..data.sources import get_source
from ..data.splits import resolve_split_file
from ..data.training_sets import retrain_length, suponly_length
from ..models import MODEL_REGISTRY, DeepLabImageProcessor, build_model
from ..models.backbone_weights import describe_backbone_weights, load_backbone_weights
from .config import (
    ConfigError,
    RunConfig,
    check_and_record_run_config,
    describe_stages,
    parse_arguments,
    resolve_run_config,
)
from .distributed import check_shared_run_dir, create_accelerator
from .divergence import NonFiniteError
from .pipeline import RunData, RunSettings, data_record, lock_run, run_pipeline
from .preemption import PREEMPTED_EXIT_CODE, Preempted, exit_with_launcher, install_stop_handlers
from .pseudo_label_export import record_unlabeled_source
from .results import results_table
from .run_layout import RunLayout
from .selection import split_by_reliability
from .stages import build_stages, snapshot_epochs
from .trainer import StageHyperParameters, steps_per_epoch

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
        f"lr: base {config.base_lr:g} for a global batch of 16 -> backbone {summary['lr']['backbone']:g}, "
        f"head {summary['lr']['head']:g} (poly 0.9, SGD momentum 0.9, wd 1e-4)",
        steps_line,
    ]
    if summary["snapshot_epochs"]:
        lines.append(f"snapshot epochs (selection): {', '.join(map(str, summary['snapshot_epochs']))}")
    window = config.sliding_window_stride
    lines += [
        f"crop {config.crop_size}, resize base {config.base_size}; val batch {config.val_batch_size}"
        + (f", sliding window {window[0]} stride {window[1]}" if window else ", whole images"),
        f"precision {config.mixed_precision}, SyncBatchNorm {'on' if config.sync_bn else 'off'}, seed {config.seed}",
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


def build_run_data(config: RunConfig, output_dir: Path, accelerator) -> tuple[RunData, dict]:
    """The sources of the run (the synthetic dataset is generated first) as :class:`RunData`, and what
    ``results.json`` says of the data besides the options (the Hub dataset and its partition).

    Refuses a val set that shares images with the training sets, and ids whose pseudo-label files the run
    directory's file system cannot hold, before any training.
    """
    layout = RunLayout(output_dir)
    if config.hub_dataset is not None:
        hub_args = HubDataArguments(**config.hub_dataset)
        sources, id2label, palette, name = load_hub_run_sources(hub_args, layout.partition, accelerator)
        if accelerator.is_main_process:
            record_unlabeled_source(output_dir, {"kind": "hub", **config.hub_dataset})
        data_metadata = {
            "dataset": name,
            "split": hub_split_name(sources["metadata"]),
            "hub_dataset": sources["metadata"],
        }
        unlabeled_entries = sources["unlabeled_entries"]
    else:
        sources, id2label, palette, unlabeled_entries = _local_sources(config, output_dir, accelerator)
        data_metadata = {}
    data = RunData(
        labeled=sources["labeled"],
        unlabeled=sources["unlabeled"],
        val=sources["val"],
        id2label=id2label,
        unlabeled_entries=unlabeled_entries,
        palette=palette,
        base_size=config.base_size,
        crop_size=config.crop_size,
    )
    # a streamed unlabeled part is compared by id only: its images are not read before the stages
    check_split_overlap(data.labeled, data.unlabeled_ids if data.stream else data.unlabeled, data.val)
    if accelerator.is_main_process:
        check_label_file_names(layout.pseudo_labels, data.unlabeled_ids)
    return data, data_metadata


def _local_sources(config: RunConfig, output_dir: Path, accelerator) -> tuple[dict, dict[int, str], list[int], list]:
    """``(sources, id2label, palette, unlabeled split entries)`` of the synthetic data or a local layout."""
    run_layout = RunLayout(output_dir)
    if config.is_synthetic:
        with accelerator.main_process_first():
            synthetic = make_synthetic_dataset(run_layout.synthetic_data, **config.synthetic)
        files, root, layout = synthetic.split_files, synthetic.root, "pascal"
        id2label, palette = synthetic.id2label, synthetic.palette
    else:
        files = {"labeled": config.labeled_id_path, "unlabeled": config.unlabeled_id_path, "val": config.val_id_path}
        root, layout = config.data_root, config.dataset
        id2label, palette = get_source(layout).classes(root)  # the data owns its class names and colours
    sources = {}
    with accelerator.main_process_first():  # the main process builds the Arrow caches, the others reuse them
        for part in ("labeled", "unlabeled", "val"):
            sources[part] = load_source(
                layout, root, files[part], require_masks=part != "unlabeled", cache_dir=run_layout.datasets_cache
            )
    if accelerator.is_main_process:  # for exporting the pseudo labels with their images later
        unlabeled_file = str(resolve_split_file(files["unlabeled"]).resolve())
        record_unlabeled_source(
            output_dir,
            {"kind": "local", "source": layout, "root": str(Path(root).resolve()), "split_file": unlabeled_file},
        )
    return sources, id2label, palette, read_split(files["unlabeled"])


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


def _check_run_dir(accelerator, output_dir: Path, record: dict) -> None:
    """Every process compares ``record`` with the saved one; then the main process records it."""
    check_and_record_run_config(output_dir, record, write=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        check_and_record_run_config(output_dir, record)
    accelerator.wait_for_everyone()


# ---- main -----------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), then print the recipe (``--dry_run``) or train; returns 0."""
    data_args, model_args, run_args, paper = parse_arguments(argv)

    import transformers
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(run_args.output_dir)
    layout = RunLayout(output_dir)
    accelerator = create_accelerator(
        mixed_precision=run_args.mixed_precision,
        gradient_accumulation_steps=run_args.gradient_accumulation_steps,
        log_with=None if run_args.report_to == "none" or run_args.dry_run else run_args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(layout.logs)),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    transformers.utils.logging.disable_progress_bar()  # per-shard bars on every save / load
    # validates every option: a bad one fails here, before any data work
    config = resolve_run_config(data_args, model_args, run_args, accelerator.num_processes, accelerator.device.type)
    if config.dry_run:
        if accelerator.is_main_process:
            print(describe_recipe(config, paper))
        return 0

    # before anything is written there: all processes see one run directory, one launch at a time holds it,
    # and the settings are those of the run it holds (the data is compared once built)
    check_shared_run_dir(accelerator, output_dir)
    lock_run(accelerator, output_dir)
    _check_run_dir(accelerator, output_dir, config.to_dict())
    data, data_metadata = build_run_data(config, output_dir, accelerator)
    record = {**config.to_dict(), "data": data_record(data)}
    _check_run_dir(accelerator, output_dir, record)

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
        **data_metadata,
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
    )
    if config.report_to != "none":
        # TensorBoard's hparams accept only scalars and strings
        scalars = {key: value for key, value in config.to_dict().items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("stpp", config=scalars)
    results = run_pipeline(accelerator, data, settings)
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
    install_stop_handlers()
    try:
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
