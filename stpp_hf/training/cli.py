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
from ..data import (
    check_label_file_names,
    check_split_overlap,
    load_source,
    read_split,
)
from ..data.hub_dataset import HubDataArguments, hub_split_name, load_hub_run_sources
from ..data.splits import resolve_split_file
from ..models import MODEL_REGISTRY, DeepLabImageProcessor, build_model
from ..models.backbone_weights import describe_backbone_weights, load_backbone_weights
from .config import (
    ConfigError,
    RunConfig,
    check_and_record_run_config,
    check_process_timeouts,
    parse_arguments,
    resolve_run_config,
)
from .data_identity import LocalData, check_local_data, identify_local_data, local_data
from .distributed import check_shared_run_dir, create_accelerator
from .divergence import NonFiniteError
from .dry_run import describe_recipe
from .heartbeat import start_heartbeat
from .pipeline import RunData, RunSettings, data_record, lock_run, run_pipeline
from .precision import gather_precision_decision
from .preemption import PREEMPTED_EXIT_CODE, Preempted, exit_with_launcher, stop_handlers
from .pseudo_label_export import record_unlabeled_source
from .results import results_table
from .run_layout import RunLayout
from .trainer import StageHyperParameters

# ---- data and model -------------------------------------------------------------------------------


def build_run_data(
    config: RunConfig, output_dir: Path, accelerator, local: LocalData | None
) -> tuple[RunData, dict, dict]:
    """The sources of the run as :class:`RunData` (``local``: of the synthetic data or a ``--data_root`` layout,
    else of the Hub dataset), what ``results.json`` says of the data besides the options (the Hub dataset and its
    partition), and how to load the unlabeled images again (for ``unlabeled_source.json``).

    Refuses a val set that shares images with the training sets, and ids whose pseudo-label files the run
    directory's file system cannot hold, before any training.
    """
    layout = RunLayout(output_dir)
    if local is None:
        hub_args = HubDataArguments(**config.hub_dataset)
        sources, id2label, palette, name = load_hub_run_sources(hub_args, layout.partition, accelerator)
        unlabeled_source = {"kind": "hub", **config.hub_dataset}
        data_metadata = {
            "dataset": name,
            "split": hub_split_name(sources["metadata"]),
            "hub_dataset": sources["metadata"],
        }
        unlabeled_entries = sources["unlabeled_entries"]
    else:
        sources, unlabeled_source = _local_sources(local, output_dir, accelerator)
        id2label, palette, data_metadata = local.id2label, local.palette, {}
        unlabeled_entries = read_split(local.split_files["unlabeled"])
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
    return data, data_metadata, unlabeled_source


# below this many images per process, starting a process costs more than it saves
CACHE_IMAGES_PER_PROCESS = 500


def cache_build_processes(num_images: int) -> int | None:
    """Processes that build (decode and validate) a dataset cache of ``num_images`` images while the other ranks
    wait for it: one per :data:`CACHE_IMAGES_PER_PROCESS` images, at most the cores this process may use; ``None``
    (this process alone) below two. The cache is the same for any number (rows in split order, same fingerprint)."""
    processes = min(len(os.sched_getaffinity(0)), num_images // CACHE_IMAGES_PER_PROCESS)
    return processes if processes > 1 else None


def _local_sources(local: LocalData, output_dir: Path, accelerator) -> tuple[dict, dict]:
    """The three sources of ``local`` and the ``unlabeled_source.json`` description of its unlabeled part."""
    sources = {}
    with accelerator.main_process_first():  # the main process builds the Arrow caches, the others reuse them
        for part in ("labeled", "unlabeled", "val"):
            sources[part] = load_source(
                local.source,
                local.root,
                local.split_files[part],
                require_masks=part != "unlabeled",
                cache_dir=RunLayout(output_dir).datasets_cache,
                num_proc=cache_build_processes(len(read_split(local.split_files[part]))),
            )
    unlabeled_file = str(resolve_split_file(local.split_files["unlabeled"]).resolve())
    unlabeled_source = {"kind": "local", "source": local.source, "root": str(local.root), "split_file": unlabeled_file}
    return sources, unlabeled_source


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
    data, data_metadata, unlabeled_source = build_run_data(config, output_dir, accelerator, local)
    record = {**config.to_dict(), "data": data_record(data) if local is None else data_section}
    _check_run_dir(accelerator, output_dir, record)
    if accelerator.is_main_process:
        if local is not None:
            file_hashes.save()
        record_unlabeled_source(output_dir, unlabeled_source)  # for exporting the pseudo labels with their images

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
