"""Data: split files, dataset sources, the method's augmentations, training sets, the pseudo-label
store and the built-in synthetic dataset."""

from .splits import SplitEntry, generate_split, read_split, shipped_split_files, shipped_split_path, write_split
from .synthetic import SyntheticDataset, make_synthetic_dataset

__all__ = [
    "SplitEntry",
    "SyntheticDataset",
    "generate_split",
    "make_synthetic_dataset",
    "read_split",
    "shipped_split_files",
    "shipped_split_path",
    "write_split",
]
