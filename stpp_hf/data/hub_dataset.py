"""The command-line options of a run on a ``datasets`` segmentation dataset (``--dataset_name``); the loading is
:mod:`stpp_hf.data.hub`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class HubDataArguments:
    """Train on a ``datasets`` segmentation dataset (the flags of the transformers semantic-segmentation examples)."""

    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset id (OWNER/NAME) or a local directory load_dataset reads."}
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration of the dataset."})
    image_column: str = field(default="image", metadata={"help": "Column of the images."})
    label_column: str = field(
        default="label",
        metadata={"help": "Column of the class-index masks ('annotation' is used when 'label' is absent)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split partitioned into labeled and unlabeled rows."})
    val_split: str = field(default="validation", metadata={"help": "Split the stages are evaluated on."})
    num_labeled: Optional[int] = field(default=None, metadata={"help": "Labeled rows of the train split."})
    labeled_fraction: Optional[str] = field(
        default=None, metadata={"help": "Labeled fraction of the train split, e.g. '1/16' or 0.0625."}
    )
    partition_seed: int = field(default=0, metadata={"help": "Seed of the labeled / unlabeled draw."})
    id2label: Optional[str] = field(
        default=None, metadata={"help": "JSON file {'0': 'name', ...} (default: the dataset's id2label.json)."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the dataset lazily, without downloading it first: selection streams the unlabeled rows, "
            "each label stage copies the images it labels into the run directory (retraining reads them there)."
        },
    )
