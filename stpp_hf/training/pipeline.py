"""Runs a whole SupOnly / ST / ST++ sequence in a run directory, resumably.

Each stage of :func:`~stpp_hf.training.stages.build_stages` is skipped when ``state.json`` says it
finished, its artefacts still match their checksums and its inputs (teacher weights, the pseudo labels
it trains on, its id lists) are those it finished with; otherwise it runs (a training stage continues
from its last epoch checkpoint, a label stage completes its pseudo-label store). At the end the last
stage's best model is copied to ``final/`` and ``results.json`` is written
(:class:`~stpp_hf.training.results.RunResults`); every path comes from :class:`~stpp_hf.training.run_layout.RunLayout`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Subset

from ..data import (
    EvalDataset,
    EvalTransform,
    FastTrainTransform,
    PseudoLabelStore,
    RetrainDataset,
    RunSources,
    StreamedEvalDataset,
    SupOnlyDataset,
    teacher_fingerprint,
)
from ..data.splits import write_split
from ..disk_full import disk_full_errors
from ..file_io import atomic_write_json, replace_directory, sha256_json, temporary_directory_for
from ..progress import progress_bar
from .config import RunConfig
from .distributed import rank_and_world_size
from .divergence import check_finite_model
from .evaluation import evaluate
from .label_next import label_next_rows, write_label_next_csv
from .plots import draw_run_figures
from .pseudo_labeling import label_images, pseudo_label_miou
from .results import FinalSummary, RunResults, StageSummary
from .run_directory import claim_run_directory
from .run_layout import RunLayout, StageLayout
from .selection import compute_reliability, split_by_reliability
from .stages import Stage, build_stages, snapshot_epochs
from .state import RunState
from .trainer import train_stage
from .visualization import save_contact_sheet, save_prediction_grid, save_selection_figure, selection_figure_rows


@dataclass
class RunSettings:
    """How to run: the resolved options, the model factory, what the run says of itself.

    ``config`` is the run's resolved :class:`~stpp_hf.training.config.RunConfig` (framework, teacher, epochs, batch
    sizes, lr, workers, where to write: ``config.run.output_dir``). ``metadata`` is copied into ``results.json``
    (dataset, split, model, backbone, ...). ``run_config`` is every setting that can change results (the record of
    ``config``, :func:`~stpp_hf.training.run_record.settings_record`, with its ``data`` section,
    :attr:`~stpp_hf.data.RunSources.identity`): a relaunch in the run directory must match it; ``results.json``
    shows it as ``config``.
    """

    config: RunConfig
    model_factory: Callable[[], torch.nn.Module]
    model_class: Any
    image_processor: Any = None
    metadata: dict = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)


class _Run:
    def __init__(self, accelerator, data: RunSources, settings: RunSettings, claimed: bool):
        self.accelerator, self.data, self.settings = accelerator, data, settings
        self.options = settings.config.run
        # absolute: stage artefacts are paths under run_dir, and a relative one would be joined to it twice
        self.run_dir = Path(self.options.output_dir).resolve()
        self.layout = RunLayout(self.run_dir)
        if not claimed:
            claim_run_directory(accelerator, self.run_dir)  # before anything is read from or written to it
        self.stages = build_stages(self.options.framework)
        self.num_classes = len(data.id2label)
        self.class_names = [data.id2label[index] for index in range(self.num_classes)]
        self.stream = data.stream
        self.unlabeled_ids = data.unlabeled_ids
        self.val_set = EvalDataset(data.val, EvalTransform())
        self.unlabeled_set = None if self.stream is not None else EvalDataset(data.unlabeled, EvalTransform())
        self.state = RunState(self.run_dir, redo=self.redone_stages(self.options.redo_stage))

    def redone_stages(self, redo_stage: str | None) -> list[str]:
        """``redo_stage`` (one of the framework's stages: checked with the options) and the stages after it (none for
        ``None``)."""
        names = [stage.name for stage in self.stages]
        return [] if redo_stage is None else names[names.index(redo_stage) :]

    # ---- paths -------------------------------------------------------------------------------
    def stage_layout(self, name: str) -> StageLayout:
        return self.layout.stage_named(self.stages, name)

    def finished_store(self, stage_name: str) -> PseudoLabelStore:
        """The pseudo-label store that finished label stage ``stage_name`` wrote."""
        return PseudoLabelStore(self.run_dir / self.state.summary(stage_name)["store_dir"], palette=self.data.palette)

    def subset_ids(self, subset: str) -> list[str]:
        if subset == "all":
            return self.unlabeled_ids
        path = self.stage_layout("select").subset_ids(subset)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the selection stage must run first")
        return self.data.ids_of_lines(path)

    def teacher_dir(self, source: str) -> Path:
        """The model of training stage ``source`` that labels images: its best or its last epoch."""
        return self.stage_layout(source).model(self.options.teacher)

    def unlabeled_subset(self, ids: list[str]) -> Subset:
        """The unlabeled evaluation set restricted to ``ids``, in that order."""
        positions = {image_id: position for position, image_id in enumerate(self.unlabeled_ids)}
        return Subset(self.unlabeled_set, [positions[image_id] for image_id in ids])

    def unlabeled_pass(self, ids: list[str]):
        """The unlabeled images ``ids`` for one sharded pass (:func:`~stpp_hf.training.inference.shard_indices`):
        in memory in the order of ``ids``; streamed in row order (``dataset.ids``), each process reading its rows."""
        if self.stream is None:
            return self.unlabeled_subset(ids)
        return StreamedEvalDataset(self.stream, ids, *rank_and_world_size(self.accelerator))

    def streamed_images(self, ids: list[str]):
        """The streamed images ``ids`` as a ``datasets.Dataset`` in that order, read from their copies in the run
        directory; each process first copies its share of those not there yet (a killed copy resumes)."""
        directory = self.layout.streamed_unlabeled
        self.stream.fetch(ids, directory, *rank_and_world_size(self.accelerator))
        self.accelerator.wait_for_everyone()
        if self.is_main():
            self.stream.verify(ids, directory)  # raises naming any missing or corrupt copy
        self.accelerator.wait_for_everyone()
        return self.stream.local_dataset(ids, directory)

    def write_ids(self, path: Path, ids: list[str]) -> None:
        """``ids`` as a split file (:attr:`~stpp_hf.data.RunSources.unlabeled_lines`)."""
        line_of_id = self.data.unlabeled_lines
        write_split(path, [line_of_id[image_id] for image_id in ids])

    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def stage_inputs(self, stage: Stage) -> dict[str, str]:
        """Fingerprints of what ``stage`` reads from earlier stages (all of which are finished when it
        starts): the teacher's weights, the id lists, the pseudo labels a re-training uses."""
        if stage.kind == "select":
            source_files = self.stage_layout(stage.source)
            inputs = {
                f"snapshot_epoch_{epoch}": teacher_fingerprint(source_files.snapshot(epoch))
                for epoch in snapshot_epochs(self.options.epochs)
            }
            return {**inputs, "teacher": teacher_fingerprint(self.teacher_dir(stage.source))}
        if stage.kind == "label":
            return {
                "teacher": teacher_fingerprint(self.teacher_dir(stage.source)),
                "ids": sha256_json(self.subset_ids(stage.subset)),
            }
        inputs = {}
        for label_stage_name in stage.pseudo_label_stages:
            label_stage = next(s for s in self.stages if s.name == label_stage_name)
            entries = self.finished_store(label_stage_name).entries()
            labels = {
                image_id: entries.get(image_id, {}).get("sha256") for image_id in self.subset_ids(label_stage.subset)
            }
            inputs[label_stage_name] = sha256_json(labels)
        return inputs

    def finish_stage(self, stage: Stage, artefacts: list[Path], summary: dict, inputs: dict[str, str]) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main():
            self.state.mark_done(stage.name, artefacts, summary, inputs)
        self.accelerator.wait_for_everyone()
        self.state.reload()

    # ---- stages ------------------------------------------------------------------------------
    def run_train(self, index: int, stage: Stage, inputs: dict[str, str]) -> dict:
        data, run = self.data, self.options
        if stage.pseudo_label_stages:
            pseudo = {}
            for label_stage_name in stage.pseudo_label_stages:
                label_stage = next(s for s in self.stages if s.name == label_stage_name)
                pseudo[label_stage_name] = (self.subset_ids(label_stage.subset), self.finished_store(label_stage_name))
            unlabeled = data.unlabeled
            if self.stream is not None:
                unlabeled = self.streamed_images([image_id for ids, _ in pseudo.values() for image_id in ids])
            train_set = RetrainDataset(
                data.labeled,
                unlabeled,
                [(ids, store) for ids, store in pseudo.values()],
                FastTrainTransform(run.base_size, run.crop_size, strong=False),
                FastTrainTransform(run.base_size, run.crop_size, strong=True),
            )
        else:
            train_set = SupOnlyDataset(data.labeled, FastTrainTransform(run.base_size, run.crop_size))
        stage_files = self.stage_layout(stage.name)
        snapshots = snapshot_epochs(self.options.epochs) if stage.keep_snapshots else ()
        summary = train_stage(
            self.settings.model_factory,
            train_set,
            self.val_set,
            self.accelerator,
            stage_files.directory,
            self.settings.config,
            stage_seed=self.options.seed * 100 + index,
            num_classes=self.num_classes,
            class_names=self.class_names,
            snapshot_epochs=snapshots,
            keep_last=self.options.teacher == "last",
            image_processor=self.settings.image_processor,
            log_prefix=stage.name,
            inputs=inputs,
        )
        summary["num_train_images"] = len(train_set)
        if self.is_main():
            best = self.settings.model_class.from_pretrained(stage_files.best)
            save_prediction_grid(
                best, self.val_set, stage_files.val_predictions, self.data.palette, device=self.accelerator.device
            )
        artefacts = [stage_files.best]
        artefacts += [stage_files.snapshot(epoch) for epoch in snapshots]
        if self.options.teacher == "last":
            artefacts.append(stage_files.last)
        self.finish_stage(stage, artefacts, summary, inputs)
        if self.is_main():  # the epoch checkpoint (weights + optimizer) only serves a resume of this stage
            shutil.rmtree(stage_files.checkpoint, ignore_errors=True)
        return summary

    def run_select(self, stage: Stage, inputs: dict[str, str]) -> dict:
        source_files = self.stage_layout(stage.source)
        epochs = snapshot_epochs(self.options.epochs)
        snapshots = [self.settings.model_class.from_pretrained(source_files.snapshot(epoch)) for epoch in epochs]
        for epoch, snapshot in zip(epochs, snapshots):  # NaN predictions would be ranked like any others
            check_finite_model(snapshot, f"the snapshot {source_files.snapshot(epoch)}")
        progress = progress_bar(
            total=len(self.unlabeled_ids), desc=stage.name, disable=not self.accelerator.is_local_main_process
        )
        scores = compute_reliability(
            snapshots,
            self.unlabeled_pass(self.unlabeled_ids),  # the unlabeled list is in row order: one streamed pass
            self.unlabeled_ids,
            self.num_classes,
            self.accelerator,
            self.options.inference_batch_size,
            progress,
            self.settings.config.data.num_workers,
        )
        progress.close()
        reliable, unreliable = split_by_reliability(scores, self.unlabeled_ids)
        stage_files = self.stage_layout(stage.name)
        if self.is_main():
            self.write_ids(stage_files.reliable_ids, reliable)
            self.write_ids(stage_files.unreliable_ids, unreliable)
            atomic_write_json(stage_files.reliability_scores, {i: scores[i] for i in self.unlabeled_ids})
            self.draw_selection(stage, scores, reliable)
        summary = {
            "num_reliable": len(reliable),
            "num_unreliable": len(unreliable),
            "teacher_miou": self.teacher_miou_by_subset(
                stage.source, {"reliable": reliable, "unreliable": unreliable}
            ),
            "figure": self.layout.relative(stage_files.selection_figure),
        }
        self.finish_stage(stage, list(stage_files.selection_files), summary, inputs)
        return summary

    def draw_selection(self, stage: Stage, scores: dict[str, float], reliable: list[str]) -> None:
        """``selection.png``: the score histogram with the cut, and the most / least reliable images with the
        SupOnly teacher's no-TTA predictions (the pseudo labels do not exist yet at selection time)."""
        teacher = self.settings.model_class.from_pretrained(self.teacher_dir(stage.source))
        images = self.unlabeled_set
        if self.stream is not None:  # read the pictured images only, as {position in the unlabeled list: item}
            rows = selection_figure_rows(self.unlabeled_ids, scores)
            pictured = StreamedEvalDataset(self.stream, list(dict.fromkeys(i for _, ids in rows for i in ids)))
            position = {image_id: index for index, image_id in enumerate(self.unlabeled_ids)}
            images = {position[image_id]: pictured[index] for index, image_id in enumerate(pictured.ids)}
        save_selection_figure(
            teacher, images, self.unlabeled_ids, scores, reliable,
            self.stage_layout(stage.name).selection_figure, self.data.palette, device=self.accelerator.device,
        )  # fmt: skip

    def teacher_miou_by_subset(self, source: str, subsets: dict[str, list[str]]) -> dict[str, float] | None:
        """mIoU against the true masks of the source stage's teacher (argmax, no TTA) on each subset
        of unlabeled ids: the check that selection picked the images the SupOnly teacher labels
        better, with one teacher for both (``None`` when unlabeled images have no masks)."""
        if not self.data.unlabeled_have_masks:
            return None
        teacher = self.settings.model_class.from_pretrained(self.teacher_dir(source))
        config = self.settings.config
        return {
            name: evaluate(
                teacher,
                self.unlabeled_pass(ids),
                self.num_classes,
                accelerator=self.accelerator,
                batch_size=config.run.val_batch_size,
                sliding_window=config.sliding_window_stride,
                num_workers=config.data.num_workers,
            )["miou"]
            for name, ids in subsets.items()
        }

    def run_label(self, stage: Stage, inputs: dict[str, str]) -> dict:
        teacher_dir = self.teacher_dir(stage.source)
        teacher = self.settings.model_class.from_pretrained(teacher_dir)
        ids = self.subset_ids(stage.subset)
        if self.stream is not None:  # labeled from local copies, which retraining reads too
            subset = EvalDataset(self.streamed_images(ids), EvalTransform())
        else:
            subset = self.unlabeled_subset(ids)
        # the store is tied to the teacher's weights: a retrained teacher never reuses stale labels
        store = PseudoLabelStore.for_teacher(
            self.layout.pseudo_labels, inputs["teacher"], stage.name, palette=self.data.palette
        )
        progress = progress_bar(total=len(ids), desc=stage.name, disable=not self.accelerator.is_local_main_process)
        workers = self.settings.config.data.num_workers
        label_images(
            teacher, subset, ids, store, self.accelerator, self.options.inference_batch_size, progress, workers
        )
        progress.close()
        self.accelerator.wait_for_everyone()
        if self.is_main():
            store.verify(ids)  # raises naming any missing or corrupt label; writes the merged manifest
        self.accelerator.wait_for_everyone()
        miou = pseudo_label_miou(store, subset, ids, self.num_classes, self.accelerator, workers)
        if miou is not None:
            self.accelerator.print(
                f"[{stage.name}] pseudo-label mIoU vs true masks: {100 * miou:.2f} ({len(ids)} images)"
            )
        summary = {
            "subset": stage.subset,
            "num_images": len(ids),
            "pseudo_label_miou": miou,
            "teacher": self.layout.relative(teacher_dir),
            "store_dir": self.layout.relative(store.directory),
        }
        self.finish_stage(stage, [store.directory], summary, inputs)
        return summary

    # ---- whole run ---------------------------------------------------------------------------
    def run(self) -> RunResults:
        started = time.perf_counter()
        for index, stage in enumerate(self.stages):
            inputs = self.stage_inputs(stage)
            if self.state.is_done(stage.name, inputs):
                self.accelerator.print(f"[{stage.name}] already finished: skipped")
                continue
            if stage.kind == "train":
                self.run_train(index, stage, inputs)
            elif stage.kind == "select":
                self.run_select(stage, inputs)
            else:
                self.run_label(stage, inputs)
        return self.finalize(time.perf_counter() - started)

    def finalize(self, wall_time_s: float) -> RunResults:
        last_train = [stage for stage in self.stages if stage.kind == "train"][-1]
        final_dir = self.layout.final
        if self.is_main():
            temporary = temporary_directory_for(final_dir)
            with disk_full_errors(final_dir, partial=temporary):
                shutil.copytree(self.stage_layout(last_train.name).best, temporary, dirs_exist_ok=True)
            replace_directory(temporary, final_dir)
        self.accelerator.wait_for_everyone()
        final_model = self.settings.model_class.from_pretrained(final_dir)
        final_metrics = evaluate(
            final_model,
            self.val_set,
            self.num_classes,
            self.class_names,
            self.accelerator,
            self.options.val_batch_size,
            self.settings.config.sliding_window_stride,
            self.settings.config.data.num_workers,
        )
        results = self.results(final_metrics, wall_time_s)
        if self.is_main():
            results.write(self.run_dir)
        self.accelerator.wait_for_everyone()
        if self.is_main():  # after the barrier: the other processes are done while the main one draws
            results = self.illustrate(results)
            results.write(self.run_dir)
        return results

    def illustrate(self, results: RunResults) -> RunResults:
        """``results`` with the pictures of the run and, for ST++, the images to label next, drawn / written."""
        figures = draw_run_figures(results, self.layout)
        return dataclasses.replace(results, figures=figures, label_next=self.export_label_next())

    def export_label_next(self) -> dict | None:
        """``label_next.csv`` / ``.png``: the least reliable unlabeled images of the select stage, next to the SupOnly
        model's predictions (an annotation aid; ``None`` without a select stage or with ``label_next`` 0)."""
        select = next((stage for stage in self.stages if stage.kind == "select"), None)
        if select is None or self.options.label_next == 0:
            return None
        scores = json.loads(self.stage_layout(select.name).reliability_scores.read_text(encoding="utf-8"))
        image_of_id = {image_id: entry.image for image_id, entry in self.data.unlabeled_lines.items()}
        rows = label_next_rows(scores, self.unlabeled_ids, image_of_id, self.options.label_next)
        ids = [row["id"] for row in rows]
        write_label_next_csv(self.layout.label_next_csv, rows)
        if self.stream is not None:  # read the pictured images only
            pictured = StreamedEvalDataset(self.stream, ids)
            item_of_id = {image_id: pictured[index] for index, image_id in enumerate(pictured.ids)}
            items = [item_of_id[image_id] for image_id in ids]
        else:
            items = self.unlabeled_subset(ids)
        teacher = self.settings.model_class.from_pretrained(self.teacher_dir(select.source))
        captions = [f"{rank}. {row['id'][:24]} ({row['reliability']:.3f})" for rank, row in enumerate(rows, 1)]
        save_contact_sheet(teacher, items, captions, self.layout.label_next_figure, self.data.palette)
        return {
            "csv": self.layout.relative(self.layout.label_next_csv),
            "figure": self.layout.relative(self.layout.label_next_figure),
            "images": rows,
        }

    def results(self, final_metrics: dict, wall_time_s: float) -> RunResults:
        stages = []
        for stage in self.stages:
            summary = self.state.summary(stage.name)
            if stage.kind == "train":
                stages.append(
                    StageSummary(
                        name=stage.name,
                        kind=stage.kind,
                        val_miou=summary["val_miou"],
                        per_class_iou=summary["per_class_iou"],
                        best_epoch=summary["best_epoch"],
                        model_dir=self.layout.relative(self.stage_layout(stage.name).best),
                        history=summary["history"],
                        confusion_matrix=summary.get("confusion_matrix"),  # None: finished before it was kept
                    )
                )
            else:
                entry = {"name": stage.name, "kind": stage.kind, **summary}
                stages.append(StageSummary.from_json(entry, self.state.path, f"the summary of stage {stage.name!r}"))
        pseudo = {
            stage.subset: self.state.summary(stage.name)["pseudo_label_miou"]
            for stage in self.stages
            if stage.kind == "label"
        }
        accelerator = self.accelerator
        device = "GPU" if accelerator.device.type == "cuda" else accelerator.device.type.upper()
        return RunResults(
            framework=self.options.framework,
            num_labeled=len(self.data.labeled),
            num_unlabeled=len(self.unlabeled_ids),
            hardware=f"{accelerator.num_processes}x {device}",
            wall_time_s=round(wall_time_s, 1),
            id2label={str(k): v for k, v in self.data.id2label.items()},
            stages=tuple(stages),
            final=FinalSummary(
                val_miou=final_metrics["miou"],
                per_class_iou=final_metrics["per_class_iou"],
                model_dir=self.layout.relative(self.layout.final),
                confusion_matrix=final_metrics["confusion_matrix"],
            ),
            pseudo_label_miou=pseudo,
            config=self.settings.run_config,
            **RunResults.split_metadata(self.settings.metadata),
        )


def run_pipeline(accelerator, data: RunSources, settings: RunSettings, claimed: bool = False) -> RunResults:
    """Run (or resume) the whole sequence of ``settings.config.run.framework``; returns what ``results.json`` holds.

    ``claimed``: the caller has already claimed the run directory for this launch
    (:func:`~stpp_hf.training.run_directory.claim_run_directory`), which is done here otherwise."""
    return _Run(accelerator, data, settings, claimed).run()
