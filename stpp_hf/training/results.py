"""The ``results.json`` of a run as typed objects: written by the pipeline, read by the Hub code and the table.

:class:`RunResults` holds the run's description, one :class:`StageSummary` per stage and the final model's
:class:`FinalSummary`; ``to_json()`` gives the file's content and ``from_json()`` reads it back, refusing a
missing field or a value of the wrong type with an error that names the file and the field (format in
ARCHITECTURE.md). :func:`results_table` is the closing table of ``stpp-train``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..file_io import atomic_write_json, parse_json
from .run_layout import RunLayout

_NUMBER = (int, float)
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true / false", dict: "an object",
               list: "a list", type(None): "null"}  # fmt: skip
# fields whose expected value needs more words than its JSON type
_EXPECTED = {"backbone_weights": "the dict of describe_backbone_weights (spec, kind, hub_id, path)"}
# the ``precision`` record (PrecisionDecision.to_json): the verdict and each distinct device of the run
PRECISION_TYPES = {"mixed_precision": (str,), "native": (bool,), "allow_emulated": (bool,), "devices": (list,)}
PRECISION_DEVICE_TYPES = {"processes": (list,), "kind": (str,), "name": (str,), "native": (dict,), "*": ()}


def _check_fields(
    data: Any, types: Mapping[str, tuple[type, ...]], required: tuple[str, ...], where: str, source: str
) -> dict:
    """The entries of the JSON object ``data`` named in ``types``, each checked against its allowed types.

    Raises:
        ValueError: ``data`` is not an object, lacks a ``required`` field, holds a field of another type, or
            (``types`` without ``"*"``) a field not in ``types``; the message names ``source`` and ``where``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {where} must be an object, got {type(data).__name__}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{source}: {where} lacks the field(s) {missing}")
    for name, value in data.items():
        if name not in types:
            if "*" in types:
                continue
            raise ValueError(f"{source}: {where} has the unknown field {name!r} (known: {sorted(types)})")
        allowed = types[name]
        # JSON true / false are Python bools, which are ints too: a number field must not take one
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = [_TYPE_NAMES[kind] for kind in allowed if not (kind is int and float in allowed)]
            expected = _EXPECTED.get(name, " or ".join(names))
            raise ValueError(f"{source}: field {where}.{name} must be {expected}, got {value!r}")
    return {name: data[name] for name in types if name in data}


@dataclass(frozen=True)
class StageSummary:
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
    kind: str
    val_miou: float | None = None
    per_class_iou: dict[str, float | None] | None = None
    best_epoch: int | None = None
    model_dir: str | None = None
    history: list[dict] | None = None
    num_reliable: int | None = None
    num_unreliable: int | None = None
    teacher_miou: dict[str, float] | None = None
    figure: str | None = None
    subset: str | None = None
    num_images: int | None = None
    pseudo_label_miou: float | None = None
    teacher: str | None = None
    store_dir: str | None = None
    confusion_matrix: list[list[int]] | None = None

    # each kind's fields in file order, and those a reader cannot do without
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
    # a field that the stage's kind does not require may also be null
    TYPES = {
        "name": (str,), "kind": (str,), "val_miou": _NUMBER, "per_class_iou": (dict,), "best_epoch": (int,),
        "model_dir": (str,), "history": (list,), "num_reliable": (int,), "num_unreliable": (int,),
        "teacher_miou": (dict,), "figure": (str,), "subset": (str,), "num_images": (int,),
        "pseudo_label_miou": _NUMBER, "teacher": (str,), "store_dir": (str,), "confusion_matrix": (list,),
    }  # fmt: skip

    def to_json(self) -> dict:
        """``name``, ``kind``, the kind's fields (None included: it says "not measured"), then any other field set."""
        own = {name: getattr(self, name) for name in self.KIND_FIELDS[self.kind]}
        others = {
            item.name: getattr(self, item.name)
            for item in dataclasses.fields(self)
            if item.name not in own and item.name not in ("name", "kind") and getattr(self, item.name) is not None
        }
        return {"name": self.name, "kind": self.kind, **own, **others}

    @classmethod
    def from_json(cls, data: Any, where: str = "stage", source: str | os.PathLike = "results.json") -> StageSummary:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: {where} must be an object, got {type(data).__name__}")
        kind = data.get("kind")
        if kind not in cls.KIND_FIELDS:
            raise ValueError(f"{source}: field {where}.kind must be one of {list(cls.KIND_FIELDS)}, got {kind!r}")
        required = ("name", "kind", *cls.REQUIRED[kind])
        types = {name: kinds if name in required else (*kinds, type(None)) for name, kinds in cls.TYPES.items()}
        return cls(**_check_fields(data, types, required, where, source))


@dataclass(frozen=True)
class FinalSummary:
    """The final model (a copy of the last training stage's best): val mIoU, per-class IoU, its directory, and
    its val confusion matrix (``[gt][pred]`` pixel counts; ``None`` in runs made before it was kept)."""

    val_miou: float
    per_class_iou: dict[str, float | None]
    model_dir: str
    confusion_matrix: list[list[int]] | None = None

    TYPES = {"val_miou": _NUMBER, "per_class_iou": (dict,), "model_dir": (str,), "confusion_matrix": (list,)}
    REQUIRED = ("val_miou", "per_class_iou", "model_dir")

    def to_json(self) -> dict:
        payload = {"val_miou": self.val_miou, "per_class_iou": self.per_class_iou, "model_dir": self.model_dir}
        if self.confusion_matrix is not None:
            payload["confusion_matrix"] = self.confusion_matrix
        return payload

    @classmethod
    def from_json(cls, data: Any, source: str | os.PathLike = "results.json") -> FinalSummary:
        types = {name: kinds if name in cls.REQUIRED else (*kinds, type(None)) for name, kinds in cls.TYPES.items()}
        return cls(**_check_fields(data, types, cls.REQUIRED, "final", source))


# what a run says of itself (``RunSettings.metadata``), in file order; any other metadata is kept in ``extra``
DESCRIPTION_TYPES = {
    "dataset": (str,), "split": (str,), "model": (str,), "backbone": (str,), "output_stride": (int,),
    "epochs": (int,), "batch_size": (int,), "lr": _NUMBER, "crop_size": (int,), "pretrained_backbone": (bool,),
    "backbone_weights": (dict,), "hub_dataset": (dict,), "precision": (dict,),
}  # fmt: skip


@dataclass(frozen=True)
class RunResults:
    """The whole ``results.json``.

    The description fields (``dataset`` ... ``hub_dataset``) are ``None`` when the run's metadata did not give
    them (``results.json`` then leaves them out); readers that need some ask with :meth:`require`.
    ``batch_size`` is the global batch, ``lr`` the base lr for a global batch of 16; ``config`` equals the run
    directory's ``run_config.json``; ``pseudo_label_miou`` is ``{subset: mIoU or None}`` of the label stages.
    ``figures`` is ``{name: path}`` of the run's pictures (:meth:`RunLayout.figures`, relative to the run directory);
    ``label_next`` is the annotation aid of an ST++ run: ``{"csv", "figure", "images": [{"id", "image",
    "reliability"}]}``, the least reliable unlabeled images first. Both are absent in older files.
    """

    framework: str
    num_labeled: int
    num_unlabeled: int
    id2label: dict[str, str]
    stages: tuple[StageSummary, ...]
    final: FinalSummary
    pseudo_label_miou: dict[str, float | None] = field(default_factory=dict)
    hardware: str | None = None
    wall_time_s: float | None = None
    config: dict | None = None
    figures: dict[str, str] | None = None
    label_next: dict | None = None
    dataset: str | None = None
    split: str | None = None
    model: str | None = None
    backbone: str | None = None
    output_stride: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    crop_size: int | None = None
    pretrained_backbone: bool | None = None
    backbone_weights: dict | None = None
    hub_dataset: dict | None = None
    precision: dict | None = None  # the device of every process and whether it computes the mixed precision
    extra: dict = field(default_factory=dict)  # further metadata, written as top-level fields
    source: str = field(default="results.json", compare=False)  # the file it was read from, for error messages

    TYPES = {
        "framework": (str,), "num_labeled": (int,), "num_unlabeled": (int,), "id2label": (dict,), "stages": (list,),
        "final": (dict,), "pseudo_label_miou": (dict,), "hardware": (str,), "wall_time_s": _NUMBER,
        "config": (dict,), "figures": (dict,), "label_next": (dict,), **DESCRIPTION_TYPES, "*": (),
    }  # fmt: skip
    REQUIRED = ("framework", "num_labeled", "num_unlabeled", "id2label", "stages", "final")

    @staticmethod
    def split_metadata(metadata: Mapping[str, Any]) -> dict:
        """``RunSettings.metadata`` as keyword arguments: the description fields, the rest in ``extra``."""
        known = {key: value for key, value in metadata.items() if key in DESCRIPTION_TYPES}
        return {**known, "extra": {key: value for key, value in metadata.items() if key not in DESCRIPTION_TYPES}}

    def to_json(self) -> dict:
        """The content of ``results.json`` (fields that are ``None`` and optional are left out)."""
        description = {key: getattr(self, key) for key in DESCRIPTION_TYPES if getattr(self, key) is not None}
        optional = {key: getattr(self, key) for key in ("hardware", "wall_time_s") if getattr(self, key) is not None}
        payload = {
            "framework": self.framework,
            **description,
            **self.extra,
            "num_labeled": self.num_labeled,
            "num_unlabeled": self.num_unlabeled,
            **optional,
            "id2label": self.id2label,
            "stages": [stage.to_json() for stage in self.stages],
            "final": self.final.to_json(),
            "pseudo_label_miou": self.pseudo_label_miou,
        }
        if self.config is not None:
            payload["config"] = self.config
        for name in ("figures", "label_next"):
            if getattr(self, name) is not None:
                payload[name] = getattr(self, name)
        return payload

    @classmethod
    def from_json(cls, data: Any, source: str | os.PathLike = "results.json") -> RunResults:
        """Check and read the parsed ``results.json`` ``data``; errors name ``source`` and the field."""
        source = str(source)
        values = _check_fields(data, cls.TYPES, cls.REQUIRED, "results", source)
        values["stages"] = tuple(
            StageSummary.from_json(stage, f"stages[{index}]", source) for index, stage in enumerate(values["stages"])
        )
        values["final"] = FinalSummary.from_json(values["final"], source)
        if values.get("precision") is not None:  # absent from the results of older versions
            record = _check_fields(values["precision"], PRECISION_TYPES, tuple(PRECISION_TYPES), "precision", source)
            for index, device in enumerate(record["devices"]):
                where = f"precision.devices[{index}]"
                _check_fields(device, PRECISION_DEVICE_TYPES, ("processes", "kind", "name", "native"), where, source)
        extra = {key: value for key, value in data.items() if key not in cls.TYPES}
        return cls(**values, extra=extra, source=source)

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> RunResults:
        """The ``results.json`` of the finished run in ``run_dir``."""
        path = RunLayout(run_dir).results
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run directory?")
        try:
            data = parse_json(path.read_text(encoding="utf-8"), path)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_json(data, path)

    def write(self, run_dir: str | os.PathLike) -> None:
        """Write ``results.json`` into ``run_dir`` atomically."""
        atomic_write_json(RunLayout(run_dir).results, self.to_json())

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
