"""The ``results.json`` of a run as typed objects: written by the pipeline, read by the Hub code and the table.

:class:`RunResults` holds the run's description, one :class:`StageSummary` per stage and the final model's
:class:`FinalSummary`; ``to_json()`` gives the file's content and ``from_json()`` reads it back, refusing a
missing field or a value of the wrong type with an error that names the file and the field (format in
ARCHITECTURE.md). :func:`results_table` is the closing table of ``stpp-train``.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from huggingface_hub.dataclasses import strict

from ..records import JsonRecord
from .run_layout import RunLayout


def _description(default=None, **metadata):
    """A field of what a run says of itself (``RunSettings.metadata``)."""
    return field(default=default, metadata={"description": True, **metadata})


@strict
@dataclass(kw_only=True)
class PrecisionDevice(JsonRecord):
    """One distinct device of the ``precision`` record (``DeviceFacts.to_json``); its further facts are kept."""

    processes: list
    kind: str
    name: str
    native: dict
    facts: dict = field(default_factory=dict)

    EXTRA_FIELD = "facts"


@strict
@dataclass(kw_only=True)
class PrecisionRecord(JsonRecord):
    """The schema of ``results.json``'s ``precision`` (``PrecisionDecision.to_json``): the verdict and each distinct
    device of the run; the results keep it as the JSON object it is."""

    mixed_precision: str
    native: bool
    allow_emulated: bool
    devices: tuple[PrecisionDevice, ...]


@strict
@dataclass(kw_only=True)
class StageSummary(JsonRecord):
    """One stage's entry in ``results.json``; which fields it has depends on ``kind``.

    train: ``val_miou`` (best epoch), ``per_class_iou`` ({class name: IoU or None for a class val lacks}),
    ``best_epoch``, ``model_dir`` (relative to the run directory), ``history`` ([{epoch, loss, val_miou}]), and
    ``confusion_matrix`` (the best epoch's ``[gt][pred]`` val pixel counts; absent in runs made before it was kept).
    select: ``num_reliable``, ``num_unreliable``, ``teacher_miou`` ({subset: mIoU of the source stage's model
    without TTA}, None without true masks), ``figure`` (the selection picture).
    label: ``subset``, ``num_images``, ``pseudo_label_miou`` (None without true masks), ``teacher`` (the model
    directory that labeled), ``store_dir`` (the pseudo-label store).
    """

    name: str
    kind: Literal["train", "select", "label"]
    val_miou: float | int | None = None
    per_class_iou: dict | None = None
    best_epoch: int | None = None
    model_dir: str | None = None
    history: list | None = None
    num_reliable: int | None = None
    num_unreliable: int | None = None
    teacher_miou: dict | None = None
    figure: str | None = None
    subset: str | None = None
    num_images: int | None = None
    pseudo_label_miou: float | int | None = None
    teacher: str | None = None
    store_dir: str | None = None
    confusion_matrix: list | None = None

    RECORD_NAME = "stage"
    # each kind's fields in file order, and those a reader cannot do without (a field no kind requires may be null)
    KIND_FIELDS = {
        "train": ("val_miou", "per_class_iou", "best_epoch", "model_dir", "history"),
        "select": ("num_reliable", "num_unreliable", "teacher_miou", "figure"),
        "label": ("subset", "num_images", "pseudo_label_miou", "teacher", "store_dir"),
    }
    REQUIRED = {
        "train": ("val_miou", "per_class_iou", "model_dir"),
        "select": ("num_reliable", "num_unreliable"),
        "label": ("num_images",),
    }

    @classmethod
    def required_fields(cls, data: dict) -> tuple[str, ...]:
        return ("name", "kind", *cls.REQUIRED.get(data.get("kind"), ()))

    def to_json(self) -> dict:
        """``name``, ``kind``, the kind's fields (None included: it says "not measured"), then any other field set."""
        own = {name: getattr(self, name) for name in self.KIND_FIELDS[self.kind]}
        others = {
            item.name: getattr(self, item.name)
            for item in dataclasses.fields(self)
            if item.name not in own and item.name not in ("name", "kind") and getattr(self, item.name) is not None
        }
        return {"name": self.name, "kind": self.kind, **own, **others}


@strict
@dataclass(kw_only=True)
class FinalSummary(JsonRecord):
    """The final model (a copy of the last training stage's best): val mIoU, per-class IoU, its directory, and
    its val confusion matrix (``[gt][pred]`` pixel counts; ``None`` in runs made before it was kept)."""

    val_miou: float | int
    per_class_iou: dict
    model_dir: str
    confusion_matrix: list | None = None

    RECORD_NAME = "final"


@strict
@dataclass(kw_only=True)
class RunResults(JsonRecord):
    """The whole ``results.json``, its fields in file order.

    The description fields (``dataset`` ... ``precision``) are ``None`` when the run's metadata did not give
    them (``results.json`` then leaves them out); readers that need some ask with :meth:`require`.
    ``global_batch_size`` and ``lr`` (the base lr for a global batch of 16) are the options' values, as in
    ``config``; ``config`` equals the run directory's ``run_config.json``; ``pseudo_label_miou`` is
    ``{subset: mIoU or None}`` of the label stages.
    ``figures`` is ``{name: path}`` of the run's pictures (:meth:`RunLayout.figures`, relative to the run directory);
    ``label_next`` is the annotation aid of an ST++ run: ``{"csv", "figure", "images": [{"id", "image",
    "reliability"}]}``, the least reliable unlabeled images first. Both are absent in older files.
    """

    framework: str
    dataset: str | None = _description()
    split: str | None = _description()
    model: str | None = _description()
    backbone: str | None = _description()
    output_stride: int | None = _description()
    epochs: int | None = _description()
    global_batch_size: int | None = _description()
    lr: float | int | None = _description()
    crop_size: int | None = _description()
    pretrained_backbone: bool | None = _description()
    backbone_weights: dict | None = _description(
        expected="the dict of describe_backbone_weights (spec, kind, hub_id, path)"
    )
    hub_dataset: dict | None = _description()
    # the device of every process and whether it computes the mixed precision
    precision: dict | None = _description(schema=PrecisionRecord)
    extra: dict = field(default_factory=dict)  # further metadata, written as top-level fields
    num_labeled: int
    num_unlabeled: int
    hardware: str | None = None
    wall_time_s: float | int | None = None
    id2label: dict
    stages: tuple[StageSummary, ...]
    final: FinalSummary
    pseudo_label_miou: dict = field(default_factory=dict)
    config: dict | None = None
    figures: dict | None = None
    label_next: dict | None = None
    # the file it was read from, for error messages
    source: str = field(default="results.json", compare=False, metadata={"json": False})

    RECORD_NAME = "results"
    EARLIER_NAMES = {"batch_size": "global_batch_size"}  # an earlier version's name of the global batch
    EXTRA_FIELD = "extra"

    @classmethod
    def split_metadata(cls, metadata: Mapping[str, Any]) -> dict:
        """``RunSettings.metadata`` as keyword arguments: the description fields, the rest in ``extra``."""
        described = {item.name for item in dataclasses.fields(cls) if item.metadata.get("description")}
        known = {key: value for key, value in metadata.items() if key in described}
        return {**known, "extra": {key: value for key, value in metadata.items() if key not in described}}

    @classmethod
    def from_json(
        cls, data: Any, source: str | os.PathLike = "results.json", where: str | None = None
    ) -> "RunResults":
        """Check and read the parsed ``results.json`` ``data``; errors name ``source`` and the field."""
        results = super().from_json(data, source, where)
        results.source = str(source)
        return results

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> "RunResults":
        """The ``results.json`` of the finished run in ``run_dir``."""
        path = RunLayout(run_dir).results
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run directory?")
        return super().read(path)

    def write(self, run_dir: str | os.PathLike) -> None:
        """Write ``results.json`` into ``run_dir`` atomically."""
        super().write(RunLayout(run_dir).results)

    def require(self, *names: str) -> None:
        """Raise naming the file and the fields when any description field in ``names`` is missing."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.source} lacks the field(s) {missing}")

    def training_stages(self) -> list[tuple[int, StageSummary]]:
        """(position in ``stages``, stage) of the stages that train a model, in run order."""
        return [(index, stage) for index, stage in enumerate(self.stages) if stage.kind == "train"]

    def class_names(self) -> list[str]:
        """The class names in index order."""
        return [self.id2label[key] for key in sorted(self.id2label, key=int)]


STAGE_TITLES = {
    "suponly": "SupOnly",
    "retrain": "ST (re-training)",
    "retrain_reliable": "ST++ stage-1 re-training (reliable)",
    "retrain_all": "ST++ stage-2 re-training (all)",
}


def stages_that_hurt(results: RunResults) -> dict[int, float]:
    """``{position in stages: change of val mIoU}`` of each training stage whose best val mIoU is lower than that of
    the training stage before it (the change is negative, as a fraction)."""
    stages = results.training_stages()
    return {
        index: stage.val_miou - previous.val_miou
        for (_, previous), (index, stage) in zip(stages, stages[1:])
        if stage.val_miou < previous.val_miou
    }


def final_model_note(results: RunResults) -> str:
    """Which model ``final/`` is: the method's last stage, whatever an earlier stage scored on val."""
    index, last = results.training_stages()[-1]
    note = f"final/ is the best-on-val model of the last stage, {index + 1} {STAGE_TITLES.get(last.name, last.name)}"
    if any(stage.val_miou > last.val_miou for _, stage in results.training_stages()):
        note += (
            "; an earlier stage scored higher on val, but it is not swapped in (choosing among stages on the val "
            "set would report a val-selected number)"
        )
    return note + "."


def results_table(results: RunResults) -> str:
    """The closing table: val mIoU of SupOnly, each re-training stage (marked when lower than the stage before it)
    and the final model, plus pseudo-label mIoU of each labeled subset, then which model ``final/`` is."""
    hurt = stages_that_hurt(results)
    rows = [
        (
            STAGE_TITLES.get(stage.name, stage.name),
            stage.val_miou,
            f"lower than the stage before ({100 * hurt[index]:+.2f})" if index in hurt else "",
        )
        for index, stage in results.training_stages()
    ]
    rows.append((f"final ({results.framework})", results.final.val_miou, ""))
    for stage in results.stages:
        # stage 5's teacher is the stage-4 model, so compare subsets on the same-teacher rows below
        if stage.kind == "label" and stage.pseudo_label_miou is not None:
            teacher = stage.teacher.removeprefix("stages/")
            name = f"pseudo labels: {stage.subset} images (teacher {teacher}, TTA)"
            rows.append((name, stage.pseudo_label_miou, ""))
    for stage in results.stages:
        for subset, miou in (stage.teacher_miou or {}).items():
            rows.append((f"SupOnly teacher, no TTA: {subset} images", miou, ""))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':<{width}}  mIoU", "-" * (width + 8)]
    lines += [
        f"{name:<{width}}  {'n/a' if math.isnan(value) else f'{100 * value:5.2f}'}{f'  {mark}' if mark else ''}"
        for name, value, mark in rows
    ]
    return "\n".join([*lines, final_model_note(results)])


__all__ = ["FinalSummary", "RunResults", "StageSummary", "final_model_note", "results_table", "stages_that_hurt"]
