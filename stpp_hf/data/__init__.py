"""Data: split files, dataset sources as ``datasets`` objects, the method's augmentations, the torch
training sets, the pseudo-label store and the built-in synthetic dataset."""

from .fast_transforms import FastTrainTransform
from .hub.loading import load_hub_sources
from .normalization import normalize_batch
from .pseudo_labels import PseudoLabelStore, check_label_file_names, teacher_fingerprint
from .run_sources import RunSources
from .sources import SOURCES, DatasetSource, load_source, read_id2label, register_source
from .splits import (
    SplitEntry,
    check_split_overlap,
    generate_split,
    list_shipped_splits,
    read_split,
    shipped_split_files,
    shipped_split_path,
    write_split,
)
from .streamed import UnlabeledStream
from .training_sets import EvalDataset, RetrainDataset, StreamedEvalDataset, SupOnlyDataset
from .transforms import EvalTransform, TrainTransform


def __getattr__(name: str):
    # imported lazily so `python -m stpp_hf.data.synthetic` does not run a module imported twice
    if name in ("SyntheticDataset", "make_synthetic_dataset"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SOURCES",
    "DatasetSource",
    "EvalDataset",
    "StreamedEvalDataset",
    "UnlabeledStream",
    "EvalTransform",
    "FastTrainTransform",
    "PseudoLabelStore",
    "RetrainDataset",
    "RunSources",
    "SplitEntry",
    "SupOnlyDataset",
    "SyntheticDataset",
    "TrainTransform",
    "check_label_file_names",
    "check_split_overlap",
    "generate_split",
    "list_shipped_splits",
    "load_hub_sources",
    "load_source",
    "make_synthetic_dataset",
    "normalize_batch",
    "read_id2label",
    "read_split",
    "register_source",
    "shipped_split_files",
    "shipped_split_path",
    "teacher_fingerprint",
    "write_split",
]
