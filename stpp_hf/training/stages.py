"""The ST / ST++ stage sequences (docs/method.md §1) as data.

A run is a list of :class:`Stage`\\ s executed in order; each one names the stages whose outputs it
reads, so the runner needs no framework-specific branches and a resumed run can tell which
artefacts a stage depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

StageKind = Literal["train", "select", "label"]
Subset = Literal["all", "reliable", "unreliable"]
FRAMEWORKS = ("suponly", "st", "stpp")


@dataclass(frozen=True)
class Stage:
    """One step of a run.

    Attributes:
        name: unique name, also the stage directory name (``stages/<index>-<name>``).
        kind: ``"train"`` (fresh model, docs/method.md §2), ``"select"`` (reliable-image selection from
            the snapshots of ``source``) or ``"label"`` (TTA pseudo labels from ``source``'s model).
        source: the training stage whose model(s) a select / label stage uses.
        subset: which unlabeled ids a label stage covers.
        pseudo_label_stages: label stages whose pseudo labels a train stage adds to the labeled set
            (none: SupOnly).
        keep_snapshots: keep the weights after epochs ``E//3``, ``2E//3`` and ``E`` (ST++ SupOnly).
    """

    name: str
    kind: StageKind
    source: str | None = None
    subset: Subset = "all"
    pseudo_label_stages: tuple[str, ...] = field(default_factory=tuple)
    keep_snapshots: bool = False


def build_stages(framework: str) -> list[Stage]:
    """The stage list of ``framework`` in ``("suponly", "st", "stpp")``."""
    if framework == "suponly":
        return [Stage("suponly", "train")]
    if framework == "st":
        return [
            Stage("suponly", "train"),
            Stage("label_all", "label", source="suponly", subset="all"),
            Stage("retrain", "train", pseudo_label_stages=("label_all",)),
        ]
    if framework == "stpp":
        return [
            Stage("suponly", "train", keep_snapshots=True),
            Stage("select", "select", source="suponly"),
            Stage("label_reliable", "label", source="suponly", subset="reliable"),
            Stage("retrain_reliable", "train", pseudo_label_stages=("label_reliable",)),
            Stage("label_unreliable", "label", source="retrain_reliable", subset="unreliable"),
            Stage("retrain_all", "train", pseudo_label_stages=("label_reliable", "label_unreliable")),
        ]
    raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


def snapshot_epochs(epochs: int) -> tuple[int, ...]:
    """1-based epochs after which ST++ keeps a snapshot: ``E//3``, ``2E//3``, ``E``.

    Raises ``ValueError`` for fewer than 3 epochs, where the snapshots would coincide.
    """
    if epochs < 3:
        raise ValueError(f"ST++ needs epochs >= 3 for three distinct snapshots, got {epochs}")
    return (epochs // 3, 2 * epochs // 3, epochs)


def stage_dir_name(index: int, stage: Stage) -> str:
    """``"1-suponly"`` for the first stage: sorted listing follows run order."""
    return f"{index + 1}-{stage.name}"
