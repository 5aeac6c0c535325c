"""Where everything of a run lives: the one owner of the run directory's layout.

::

    <run_dir>/
      run_config.json  state.json  run.lock  results.json  unlabeled_source.json  data_files.json
      label_next.csv  label_next.png       ST++: the least reliable unlabeled images (an annotation aid)
      figures/                             the run's result pictures (RunLayout.figures)
      final/                               the last training stage's best model (save_pretrained)
      stages/<i>-<name>/                   one per stage, in run order (stages.stage_dir_name)
        best/  last/  snapshots/epoch_<e>/ checkpoint/  val_predictions.png      (train stages)
        reliable_ids.txt  unreliable_ids.txt  reliability.json  selection.png   (the select stage)
      pseudo_labels/<stage>-<teacher>/     pseudo-label stores (data.pseudo_labels.PseudoLabelStore.for_teacher)
      partition/                           labeled / unlabeled partition of a `datasets` dataset
      streamed_unlabeled/                  --streaming: copies of the unlabeled images the label stages labeled
      synthetic_data/  datasets_cache/  logs/  heartbeats/

``results.json`` names directories relative to the run directory (:meth:`RunLayout.relative`), so a run
directory can be moved or copied whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .stages import Stage, stage_dir_name


@dataclass(frozen=True)
class StageLayout:
    """The files of one stage directory ``stages/<i>-<name>/``."""

    directory: Path

    @property
    def best(self) -> Path:
        """The best-on-val model (``save_pretrained``) of a training stage."""
        return self.directory / "best"

    @property
    def last(self) -> Path:
        """The last epoch's model (kept when pseudo labels come from the last model)."""
        return self.directory / "last"

    @property
    def checkpoint(self) -> Path:
        """The ``accelerator.save_state`` epoch checkpoint a resumed training stage continues from."""
        return self.directory / "checkpoint"

    def snapshot(self, epoch: int) -> Path:
        """The model after (1-based) ``epoch``, kept for ST++ selection."""
        return self.directory / "snapshots" / f"epoch_{epoch}"

    def model(self, teacher: str) -> Path:
        """The model that labels images: ``best`` or ``last``."""
        return self.best if teacher == "best" else self.last

    @property
    def val_predictions(self) -> Path:
        return self.directory / "val_predictions.png"

    @property
    def reliable_ids(self) -> Path:
        """Split file of the images the select stage found reliable: the unlabeled split's lines (local data) or
        one row id per line (Hub data)."""
        return self.directory / "reliable_ids.txt"

    @property
    def unreliable_ids(self) -> Path:
        return self.directory / "unreliable_ids.txt"

    def subset_ids(self, subset: str) -> Path:
        """The split file of ``subset`` (``"reliable"`` or ``"unreliable"``) of a select stage."""
        return self.reliable_ids if subset == "reliable" else self.unreliable_ids

    @property
    def reliability_scores(self) -> Path:
        """JSON ``{id: reliability score}`` of every unlabeled image."""
        return self.directory / "reliability.json"

    @property
    def selection_figure(self) -> Path:
        return self.directory / "selection.png"

    @property
    def selection_files(self) -> tuple[Path, ...]:
        """Everything the select stage writes (its artefacts in ``state.json``)."""
        return self.reliable_ids, self.unreliable_ids, self.reliability_scores, self.selection_figure


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run directory ``run_dir`` (nothing is read or made)."""

    run_dir: Path

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))  # a str or any PathLike

    def stage(self, index: int, stage: Stage) -> StageLayout:
        """The directory of ``stage``, the ``index``-th (from 0) of its run's stage list."""
        return StageLayout(self.run_dir / "stages" / stage_dir_name(index, stage))

    def stage_named(self, stages: list[Stage], name: str) -> StageLayout:
        """The directory of the stage called ``name`` in the run's stage list ``stages``."""
        index = next(index for index, stage in enumerate(stages) if stage.name == name)
        return self.stage(index, stages[index])

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` (under the run directory) as ``results.json`` / ``state.json`` name it: relative, POSIX."""
        return Path(path).relative_to(self.run_dir).as_posix()

    @property
    def final(self) -> Path:
        """Copy of the last training stage's best model: the run's result."""
        return self.run_dir / "final"

    @property
    def results(self) -> Path:
        """``results.json`` (:class:`~stpp_hf.training.results.RunResults`)."""
        return self.run_dir / "results.json"

    def figures(self) -> dict[str, Path]:
        """The result pictures by name (``results.json`` ``figures``): val mIoU per epoch of every training stage,
        the val confusion matrices of the final model and of SupOnly, the per-class IoU of every stage."""
        names = ("val_miou_per_epoch", "confusion_final", "confusion_suponly", "per_class_iou")
        return {name: self.run_dir / "figures" / f"{name}.png" for name in names}

    @property
    def label_next_csv(self) -> Path:
        """The least reliable unlabeled images of the ST++ selection, to label next: rank, id, image, score."""
        return self.run_dir / "label_next.csv"

    @property
    def label_next_figure(self) -> Path:
        """Contact sheet of the ``label_next.csv`` images next to the SupOnly model's predictions."""
        return self.run_dir / "label_next.png"

    @property
    def run_config(self) -> Path:
        """Every setting that can change results; a relaunch must match it."""
        return self.run_dir / "run_config.json"

    @property
    def state(self) -> Path:
        """The finished stages with their artefacts' checksums (:class:`~stpp_hf.training.state.RunState`)."""
        return self.run_dir / "state.json"

    @property
    def lock(self) -> Path:
        return self.run_dir / "run.lock"

    @property
    def lock_file(self) -> Path:
        """The lock of a file system without ``flock``: it exists while a launch holds the run directory."""
        return self.run_dir / "run.lock.held"

    @property
    def unlabeled_source(self) -> Path:
        """How to load the run's unlabeled images again (for exporting the pseudo labels)."""
        return self.run_dir / "unlabeled_source.json"

    @property
    def pseudo_labels(self) -> Path:
        """The root of the pseudo-label stores, one per label stage and teacher."""
        return self.run_dir / "pseudo_labels"

    @property
    def partition(self) -> Path:
        """The labeled / unlabeled partition drawn from a ``datasets`` dataset's train split."""
        return self.run_dir / "partition"

    @property
    def synthetic_data(self) -> Path:
        return self.run_dir / "synthetic_data"

    @property
    def streamed_unlabeled(self) -> Path:
        """With ``--streaming``: copies of the streamed images the label stages labeled (retraining reads them)."""
        return self.run_dir / "streamed_unlabeled"

    @property
    def datasets_cache(self) -> Path:
        """``datasets``' Arrow cache of the run's local sources."""
        return self.run_dir / "datasets_cache"

    @property
    def data_files(self) -> Path:
        """The SHA-256 of every file of a local dataset (:class:`~stpp_hf.data.sources.content.FileHashes`)."""
        return self.run_dir / "data_files.json"

    @property
    def logs(self) -> Path:
        """The trackers' logging directory."""
        return self.run_dir / "logs"

    @property
    def heartbeats(self) -> Path:
        """One beat file per process of the running launch (:mod:`~stpp_hf.training.heartbeat`)."""
        return self.run_dir / "heartbeats"
