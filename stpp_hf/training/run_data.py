"""The data and the model of a run from its resolved settings: the :class:`~stpp_hf.data.RunSources` of a local
dataset (:func:`local_run_sources`: a layout or the synthetic data) or of a ``datasets`` one
(:func:`hub_run_sources`), checked, and the factory of each stage's fresh model."""

from __future__ import annotations

import os
from pathlib import Path

from ..convert_original import load_coco_init
from ..data import check_label_file_names, check_split_overlap, load_hub_sources, load_source, read_split
from ..data.run_sources import RunSources
from ..data.splits import resolve_split_file
from ..models import MODEL_REGISTRY, DeepLabImageProcessor, build_model
from ..models.backbone_weights import describe_backbone_weights, load_backbone_weights
from .config import RunConfig
from .data_identity import LocalData, check_hub_data, check_local_data, identify_local_data, local_data
from .pipeline import RunSettings
from .pseudo_label_export import record_unlabeled_source
from .run_directory import check_run_record
from .run_layout import RunLayout

# below this many images per process, starting a process costs more than it saves
CACHE_IMAGES_PER_PROCESS = 500


def build_run_data(
    config: RunConfig, output_dir: Path, accelerator, local: LocalData | None, local_identity: dict | None = None
) -> RunSources:
    """The sources of the run, which the stages read (``local``: of the synthetic data or a ``--data_root`` layout,
    identified by ``local_identity``; else of the Hub dataset).

    Refuses a val set that shares images with the training sets, and ids whose pseudo-label files the run
    directory's file system cannot hold, before any training.
    """
    if local is None:
        sources = hub_run_sources(config.record()["hub_dataset"], RunLayout(output_dir).partition, accelerator)
    else:
        sources = local_run_sources(local, local_identity, output_dir, accelerator)
    # a streamed unlabeled part is compared by id only: its images are not read before the stages
    check_split_overlap(sources.labeled, sources.unlabeled_ids if sources.stream else sources.unlabeled, sources.val)
    if accelerator.is_main_process:
        check_label_file_names(RunLayout(output_dir).pseudo_labels, sources.unlabeled_ids)
    return sources


def hub_run_sources(options: dict, partition_dir: Path, accelerator) -> RunSources:
    """The sources of a ``--dataset_name`` run (``options``: the run config's ``hub_dataset``, the
    ``HubDataArguments``). The main process draws the partition (and fills ``datasets``' cache) first, the others
    then read it."""
    options = dict(options)
    with accelerator.main_process_first():
        return load_hub_sources(options.pop("dataset_name"), partition_dir, id2label_file=options.pop("id2label"),
                                **options)  # fmt: skip


def cache_build_processes(num_images: int) -> int | None:
    """Processes that build (decode and validate) a dataset cache of ``num_images`` images while the other ranks
    wait for it: one per :data:`CACHE_IMAGES_PER_PROCESS` images, at most the cores this process may use; ``None``
    (this process alone) below two. The cache is the same for any number (rows in split order, same fingerprint)."""
    processes = min(len(os.sched_getaffinity(0)), num_images // CACHE_IMAGES_PER_PROCESS)
    return processes if processes > 1 else None


def local_run_sources(local: LocalData, identity: dict, output_dir: Path, accelerator) -> RunSources:
    """The sources of ``local``, whose ``data`` section (:func:`~.data_identity.identify_local_data`) is
    ``identity``."""
    parts = {}
    with accelerator.main_process_first():  # the main process builds the Arrow caches, the others reuse them
        for part in ("labeled", "unlabeled", "val"):
            parts[part] = load_source(
                local.source,
                local.root,
                local.split_files[part],
                require_masks=part != "unlabeled",
                cache_dir=RunLayout(output_dir).datasets_cache,
                num_proc=cache_build_processes(len(read_split(local.split_files[part]))),
            )
    unlabeled_file = str(resolve_split_file(local.split_files["unlabeled"]).resolve())
    unlabeled_split = read_split(local.split_files["unlabeled"])
    return RunSources(
        **parts,
        id2label=local.id2label,
        palette=local.palette,
        unlabeled_split=unlabeled_split,
        unlabeled_have_masks=all(entry.mask is not None for entry in unlabeled_split),
        identity=identity,
        unlabeled_source={
            "kind": "local",
            "source": local.source,
            "root": str(local.root),
            "split_file": unlabeled_file,
        },
    )


def model_factory(config: RunConfig, id2label: dict[int, str]):
    """A fresh model of the recipe with its initial weights, once per training stage."""
    config_kwargs = dict(
        backbone=config.model.backbone,
        output_stride=config.model.output_stride,
        num_labels=len(id2label),
        id2label=id2label,
    )

    def factory():
        model = build_model(config.model.model, **config_kwargs)
        if config.model.coco_init is not None:
            load_coco_init(model, config.model.coco_init)
        elif config.model.backbone_weights != "none":
            load_backbone_weights(model, config.model.backbone_weights)
        return model

    return factory


def load_run_data(accelerator, config: RunConfig, output_dir: Path) -> tuple[RunSources, dict]:
    """The run's data once it is the run directory's: ``(its sources, the run config record with their data
    section)``. Local data is compared by content before any cache is
    built (a refused launch changes nothing); a ``datasets`` dataset by its rows' content once loaded."""
    local = None if config.is_hub else local_data(config, output_dir, accelerator)
    data_section = None
    if local is not None:
        data_section, file_hashes = identify_local_data(local, output_dir, accelerator)

        def check_data(run_dir, section, write):
            check_local_data(run_dir, local, section, file_hashes, write)

        check_run_record(accelerator, output_dir, data_section, check=check_data)
        check_run_record(accelerator, output_dir, {**config.record(), "data": data_section})
    sources = build_run_data(config, output_dir, accelerator, local, data_section)
    if local is None:
        name = config.record()["hub_dataset"]["dataset_name"]

        def check_hub(run_dir, section, write):  # the rows are compared only: nothing to take over
            check_hub_data(run_dir, section, name)

        check_run_record(accelerator, output_dir, sources.identity, check=check_hub)
    record = {**config.record(), "data": sources.identity}
    check_run_record(accelerator, output_dir, record)
    if accelerator.is_main_process:
        if local is not None:
            file_hashes.save()
        record_unlabeled_source(output_dir, sources.unlabeled_source)  # to export the pseudo labels with images
    return sources, record


def run_settings(config: RunConfig, data: RunSources, record: dict, extra: dict) -> RunSettings:
    """How the pipeline runs ``config`` on ``data``; ``extra`` goes into ``results.json`` too."""
    metadata = {
        "dataset": config.data_kind,
        "split": config.data.split or ("synthetic" if config.is_synthetic else "custom"),
        "model": config.model.model,
        "backbone": config.model.backbone,
        "output_stride": config.model.output_stride,
        "epochs": config.run.epochs,
        "global_batch_size": config.run.global_batch_size,
        "lr": config.run.lr,
        "crop_size": config.run.crop_size,
        "pretrained_backbone": config.model.backbone_weights != "none" or config.model.coco_init is not None,
        "backbone_weights": describe_backbone_weights(config.model.backbone_weights, config.model.backbone),
        **extra,
    }
    return RunSettings(
        config=config,
        model_factory=model_factory(config, data.id2label),
        model_class=MODEL_REGISTRY[config.model.model][1],
        image_processor=DeepLabImageProcessor(),
        metadata=metadata,
        run_config=record,
    )
