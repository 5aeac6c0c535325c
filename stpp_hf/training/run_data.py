"""The data of a run as :class:`~stpp_hf.training.pipeline.RunData`: the :class:`~stpp_hf.data.RunSources` of a
local dataset (:func:`local_run_sources`) or of a ``datasets`` one (:func:`hub_run_sources`), checked."""

from __future__ import annotations

import os
from pathlib import Path

from ..data import check_label_file_names, check_split_overlap, load_hub_sources, load_source, read_split
from ..data.run_sources import RunSources
from ..data.splits import resolve_split_file
from .config import RunConfig
from .data_identity import LocalData
from .pipeline import RunData
from .run_layout import RunLayout

# below this many images per process, starting a process costs more than it saves
CACHE_IMAGES_PER_PROCESS = 500


def build_run_data(
    config: RunConfig, output_dir: Path, accelerator, local: LocalData | None, local_identity: dict | None = None
) -> tuple[RunData, RunSources]:
    """The sources of the run (``local``: of the synthetic data or a ``--data_root`` layout, identified by
    ``local_identity``; else of the Hub dataset) and the :class:`RunData` the stages read.

    Refuses a val set that shares images with the training sets, and ids whose pseudo-label files the run
    directory's file system cannot hold, before any training.
    """
    if local is None:
        sources = hub_run_sources(config.hub_dataset, RunLayout(output_dir).partition, accelerator)
    else:
        sources = local_run_sources(local, local_identity, output_dir, accelerator)
    data = RunData(
        labeled=sources.labeled,
        unlabeled=sources.unlabeled,
        val=sources.val,
        id2label=sources.id2label,
        unlabeled_entries=sources.unlabeled_entries,
        palette=sources.palette,
        base_size=config.base_size,
        crop_size=config.crop_size,
    )
    # a streamed unlabeled part is compared by id only: its images are not read before the stages
    check_split_overlap(data.labeled, data.unlabeled_ids if data.stream else data.unlabeled, data.val)
    if accelerator.is_main_process:
        check_label_file_names(RunLayout(output_dir).pseudo_labels, data.unlabeled_ids)
    return data, sources


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
    return RunSources(
        **parts,
        id2label=local.id2label,
        palette=local.palette,
        unlabeled_entries=read_split(local.split_files["unlabeled"]),
        identity=identity,
        unlabeled_source={
            "kind": "local",
            "source": local.source,
            "root": str(local.root),
            "split_file": unlabeled_file,
        },
    )
