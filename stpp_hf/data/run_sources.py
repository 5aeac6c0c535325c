"""What a run takes from its data, local (a ``--data_root`` layout, the synthetic data) or a ``datasets`` dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset

from .splits import SplitEntry
from .streamed import UnlabeledStream


@dataclass
class RunSources:
    """The three parts of a run's data (features ``id``, ``image``, ``label``), their classes, and what the run
    directory records of them.

    ``identity`` is ``run_config.json``'s ``data`` section: a relaunch on other data is refused by it.
    ``unlabeled_source`` is ``unlabeled_source.json``, how to load the unlabeled images again (to export the pseudo
    labels with them). ``metadata`` is what ``results.json`` says of the data besides the options.
    """

    labeled: Dataset
    unlabeled: Dataset | UnlabeledStream  # an UnlabeledStream with ``--streaming``
    val: Dataset
    id2label: dict[int, str]
    palette: list[int] | None
    # the split-file line of each unlabeled image in the order of its ids (local data); ``None`` for Hub data, whose
    # ids (row ids) are their lines
    unlabeled_split: list[SplitEntry] | None
    unlabeled_have_masks: bool  # every unlabeled image has its true mask (selection's teacher check uses them)
    identity: dict
    unlabeled_source: dict
    metadata: dict = field(default_factory=dict)
