"""What a run takes from its data, local (a ``--data_root`` layout, the synthetic data) or a ``datasets`` dataset: the
one contract between the data and the stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from datasets import Dataset

from .splits import SplitEntry, read_split
from .streamed import UnlabeledStream


@dataclass
class RunSources:
    """The three parts of a run's data (features ``id``, ``image``, ``label``), their classes, and what the run
    directory records of them.

    ``unlabeled`` is an :class:`~stpp_hf.data.UnlabeledStream` with ``--streaming``. ``unlabeled_split`` is the
    split-file line of each unlabeled image in the order of its ids (local data); ``None`` for Hub data, whose ids
    (row ids) are their lines. ``identity`` is ``run_config.json``'s ``data`` section: a relaunch on other data is
    refused by it. ``unlabeled_source`` is ``unlabeled_source.json``, how to load the unlabeled images again (to
    export the pseudo labels with them). ``metadata`` is what ``results.json`` says of the data besides the options.
    """

    labeled: Dataset
    unlabeled: Dataset | UnlabeledStream
    val: Dataset
    id2label: dict[int, str]
    palette: list[int] | None
    unlabeled_split: list[SplitEntry] | None
    unlabeled_have_masks: bool  # every unlabeled image has its true mask (selection's teacher check uses them)
    identity: dict = field(default_factory=dict)
    unlabeled_source: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def stream(self) -> UnlabeledStream | None:
        """The unlabeled part when it is streamed (``--streaming``), else ``None``."""
        return self.unlabeled if isinstance(self.unlabeled, UnlabeledStream) else None

    @cached_property
    def unlabeled_ids(self) -> list[str]:
        """The ids of the unlabeled images in row order, streamed or not (a stream is known by its ids until the
        stages read its images); read once."""
        return list(self.stream.ids if self.stream is not None else self.unlabeled["id"])

    @cached_property
    def unlabeled_lines(self) -> dict[str, SplitEntry]:
        """The split-file line of each unlabeled id, which the select stage's subset files hold (so that, on local
        data, they are split files of the dataset): the unlabeled split's, or the id alone (Hub data)."""
        ids = self.unlabeled_ids
        if self.unlabeled_split is None:
            return {image_id: SplitEntry(image_id) for image_id in ids}
        return dict(zip(ids, self.unlabeled_split))

    def ids_of_lines(self, path: Path) -> list[str]:
        """The unlabeled ids of split file ``path`` (a subset file read back), by each line's image: its id on Hub
        data, where an earlier version wrote ``<id> <id>/<label column>`` lines."""
        id_of_image = {entry.image: image_id for image_id, entry in self.unlabeled_lines.items()}
        entries = read_split(path)
        unknown = [entry.image for entry in entries if entry.image not in id_of_image]
        if unknown:
            raise ValueError(f"{path} lists images that are not in the unlabeled split, e.g. {unknown[:3]}")
        return [id_of_image[entry.image] for entry in entries]
