"""The model card of a run, rendered from its `results.json` (:class:`~stpp_hf.training.results.RunResults`).

`build_model_card(results, repo_id)` fills the package's template (`stpp_hf/hub_cards/stpp_model_card.md`):
metadata (library, tags, datasets, license, `base_model`, a `model-index` of val mIoU), the training setup, the
mIoU of every stage and the final model (a stage lower than the one before it marked, and which model `final/` is),
the pseudo labels' mIoU, the per-class IoU, the run's pictures, the images to label next and, given a
:class:`~stpp_hf.compare.Comparison`, the aggregate of the runs the model belongs to. `eval_result_files` gives the
same val mIoU as the `.eval_results/*.yaml` entries of huggingface_hub. `stpp_hf.hub` uploads them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, EvalResultEntry, ModelCard, ModelCardData, eval_result_entries_to_yaml

from .file_io import json_text
from .training.precision import DeviceFacts
from .training.results import RunResults, StageSummary, final_model_note, stages_that_hurt

CARD_TEMPLATE_PATH = Path(__file__).parent / "hub_cards" / "stpp_model_card.md"
FRAMEWORK_TITLES = {
    "suponly": "SupOnly (labeled images only)",
    "st": "ST (self-training)",
    "stpp": "ST++ (self-training)",
}
ARCHITECTURE_TITLES = {"deeplabv3plus": "DeepLabV3+", "deeplabv2": "DeepLabV2"}
CARD_FIELDS = ("dataset", "split", "model", "backbone")  # what a card cannot be written without
PAPER_URL = "https://arxiv.org/abs/2106.05095"
SELECTION_FIGURE_IN_REPO = "selection.png"  # the ST++ selection picture, uploaded next to the final model
COMPARISON_FIGURE_IN_REPO = "comparison.png"  # the val mIoU of the runs a model belongs to (with a comparison)
# the run's pictures (results.json "figures"), uploaded at their run-directory paths, in card order
FIGURE_TITLES = {
    "val_miou_per_epoch": "Val mIoU per epoch of every training stage",
    "per_class_iou": "Per-class val IoU of every stage",
    "confusion_final": "Val confusion matrix of the final model, normalised per true class",
    "confusion_suponly": "Val confusion matrix of SupOnly, normalised per true class",
}
EVAL_RESULTS_DIR = ".eval_results"  # huggingface_hub's folder of evaluation results (constants.EVAL_RESULTS_FOLDER)
# the package's own license (pyproject.toml), the default of the cards it writes
DEFAULT_LICENSE = "apache-2.0"


def framework_title(results: RunResults) -> str:
    return FRAMEWORK_TITLES.get(results.framework, results.framework)


def stage_branch_name(index: int, stage: StageSummary) -> str:
    """`"stage-1-suponly"` for the first stage: the branch a stage's best model is pushed to (index from 0)."""
    return f"stage-{index + 1}-{stage.name}"


def selection_figure(results: RunResults) -> str | None:
    """The run-directory path of the ST++ selection picture (`selection.png` of the select stage), if any."""
    return next((stage.figure for stage in results.stages if stage.figure), None)


def card_files(results: RunResults) -> list[str]:
    """The run-directory paths of the pictures the final model's card embeds (uploaded at the same paths)."""
    paths = [results.figures[name] for name in FIGURE_TITLES if name in (results.figures or {})]
    if results.label_next is not None:
        paths.append(results.label_next["figure"])
    return paths


def _eval_dataset(results: RunResults) -> tuple[str, str, str]:
    """(dataset id, val split, note): the Hub dataset when the run read one, else the dataset's name."""
    hub = results.hub_dataset
    if hub is not None:
        config = f", config {hub['dataset_config']}" if hub.get("dataset_config") else ""
        return hub["dataset_name"], hub["val_split"], f"Hub dataset {hub['dataset_name']}{config}"
    return results.dataset, "val", f"{results.dataset} val set (not a Hub dataset)"


def eval_result_files(results: RunResults, stage_index: int | None = None) -> dict[str, bytes]:
    """The `.eval_results/*.yaml` files (huggingface_hub's `EvalResultEntry` format) of a revision: val mIoU (%).

    For the final model (`stage_index` None): `final.yaml` and one `stage-<n>-<name>.yaml` per training stage, as the
    `model-index` lists them; for a stage's branch: that stage's file alone. Each entry's `notes` name the model.
    """
    dataset_id, val_split, dataset_note = _eval_dataset(results)

    def entry(miou: float, model: str) -> bytes:
        notes = f"mIoU (%) on the {dataset_note}, {model}; trained on split {results.split} with stpp_hf"
        entries = [EvalResultEntry(dataset_id=dataset_id, task_id=val_split, value=_percent(miou), notes=notes)]
        return yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False).encode()

    stages = results.training_stages()
    if stage_index is not None:
        stages = [(index, stage) for index, stage in stages if index == stage_index]
    files = {
        f"{EVAL_RESULTS_DIR}/{stage_branch_name(index, stage)}.yaml": entry(
            stage.val_miou,
            f"stage {index + 1} {stage.name} best-on-val model (branch {stage_branch_name(index, stage)})",
        )
        for index, stage in stages
    }
    if stage_index is None:
        final = entry(results.final.val_miou, f"final {framework_title(results)} model (main)")
        files = {f"{EVAL_RESULTS_DIR}/final.yaml": final, **files}
    return files


def _percent(fraction: float) -> float:
    return round(100 * float(fraction), 2)


def _percent_cell(fraction: float | None) -> str:
    """``"41.00"`` for 0.41; ``"n/a"`` for a class the val set lacks (IoU ``None`` in results.json, or NaN)."""
    if fraction is None or math.isnan(fraction):
        return "n/a"
    return f"{_percent(fraction):.2f}"


def _format_wall_time(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    hours, remainder = divmod(int(round(seconds)), 3600)
    minutes, seconds = divmod(remainder, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def _precision_text(results: RunResults) -> str:
    """The precision and the device of every process, e.g. ``"bf16 mixed precision, native: processes 0-1 on CPU
    AMD EPYC (x86_64, AVX512; avx512_bf16)"``; ``"unknown"`` for a run that did not record it."""
    record = results.precision
    if record is None:
        return "unknown"
    mode = record["mixed_precision"]
    name = "fp32 (no mixed precision)" if mode == "no" else f"{mode} mixed precision"
    verdict = "native" if record["native"] else "not native on every device, run anyway"
    devices = []
    for device in record["devices"]:
        facts = {key: value for key, value in device.items() if key not in ("processes", "native", "problem")}
        ranks = device["processes"]
        devices.append(f"process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} on "
                       + DeviceFacts.from_json(facts).summary())  # fmt: skip
    return f"{name}, {verdict}: {'; '.join(devices)}"


def _or_unknown(value) -> object:
    return "unknown" if value is None else value


def build_model_card(
    results: RunResults | dict,
    repo_id: str,
    *,
    stage_index: int | None = None,
    license: str = DEFAULT_LICENSE,
    template_path: str | os.PathLike = CARD_TEMPLATE_PATH,
    comparison=None,
) -> ModelCard:
    """Render the model card of a run from its `results.json` content.

    Args:
        results: the run's results (`RunResults.read(run_dir)`), or the parsed `results.json` (checked here).
        repo_id: the Hub repo the card describes (used in the loading snippets).
        stage_index: None for the card of the final model (on `main`); the position of a training stage in
            `results.stages` for the card of that stage's branch.
        license: the license metadata of the repo.
        template_path: the Jinja2 template (`stpp_hf/hub_cards/stpp_model_card.md`).
        comparison: a :class:`~stpp_hf.compare.Comparison` of the runs this model belongs to (its run among them):
            the final card then shows their mean ± std, min and max per stage and the comparison picture.

    Returns:
        A `ModelCard` whose metadata hold library name, tags, datasets, license, `base_model` (the Hub repo of the
        backbone's initial weights, from `results.backbone_weights["hub_id"]`; absent when they came
        from no Hub repo) and a `model-index` with the val mIoU (%) of the model in this revision first, then (final
        card only) each training stage.
    """
    if not isinstance(results, RunResults):
        results = RunResults.from_json(results)
    results.require(*CARD_FIELDS)
    if not Path(template_path).is_file():
        raise FileNotFoundError(
            f"model card template {template_path} not found (it ships as stpp_hf/hub_cards/); "
            "pass template_path= to use another"
        )
    title = framework_title(results)
    stages = results.training_stages()

    def eval_result(metric_name: str, miou: float) -> EvalResult:
        return EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=results.dataset,
            dataset_name=f"{results.dataset} ({results.split})",
            dataset_split="val",
            metric_type="mean_iou",
            metric_name=metric_name,
            metric_value=_percent(miou),
        )

    if stage_index is None:
        revision, revision_note = None, None
        eval_results = [eval_result("val mIoU (%), final model", results.final.val_miou)]
        eval_results += [
            eval_result(f"val mIoU (%), stage {index + 1} {stage.name}", stage.val_miou) for index, stage in stages
        ]
    else:
        stage = results.stages[stage_index]
        if stage.kind != "train":
            raise ValueError(f"stage {stage_index} ({stage.name!r}) trains no model, so it has no card")
        revision = stage_branch_name(stage_index, stage)
        revision_note = (
            f"This branch (`{revision}`) holds the best-on-val model of stage {stage_index + 1} ({stage.name}). "
            f"The final {title} model is on `main`."
        )
        eval_results = [eval_result(f"val mIoU (%), stage {stage_index + 1} {stage.name}", stage.val_miou)]

    model_name = repo_id.split("/")[-1] + (f" ({revision})" if revision else "")
    backbone_hub_id = (results.backbone_weights or {}).get("hub_id")
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=license,
        datasets=_dataset_ids(results),
        tags=["semantic-segmentation", "semi-supervised", "self-training", "stpp", results.model, results.backbone],
        metrics=["mean_iou"],
        eval_results=eval_results,
        backbone=results.backbone,
        base_model=backbone_hub_id.partition("@")[0] if backbone_hub_id else None,  # a repo id, without @revision
        paper=PAPER_URL,
    )

    iou_columns = [f"stage {index + 1} {stage.name}" for index, stage in stages] + ["final"]
    per_class = [stage.per_class_iou for _, stage in stages] + [results.final.per_class_iou]
    iou_rows = [
        {"name": name, "cells": [_percent_cell(table[name]) if name in table else "-" for table in per_class]}
        for name in results.class_names()
    ]
    hurt = stages_that_hurt(results)
    miou_rows = [
        {
            "name": column,
            "miou": _percent_cell(stage.val_miou),
            "note": f"lower than the stage before ({100 * hurt[index]:+.2f})" if index in hurt else "",
        }
        for column, (index, stage) in zip(iou_columns, stages)
    ]
    miou_rows.append({"name": f"final model, {title}", "miou": _percent_cell(results.final.val_miou), "note": ""})
    final_card = stage_index is None
    pseudo_label_rows = [
        {"name": f"{subset} images, TTA labels of their stage's teacher", "miou": _percent_cell(miou)}
        for subset, miou in results.pseudo_label_miou.items()
        if miou is not None
    ]
    # ST++ selection check: one teacher (SupOnly, no TTA) for both subsets, so they compare
    pseudo_label_rows += [
        {"name": f"{subset} images, SupOnly teacher without TTA", "miou": _percent_cell(miou)}
        for stage in results.stages
        for subset, miou in (stage.teacher_miou or {}).items()
    ]
    return ModelCard.from_template(
        card_data,
        template_path=template_path,
        repo_id=repo_id,
        title=model_name,
        revision_argument=f', revision="{revision}"' if revision else "",
        revision_note=revision_note,
        framework_title=title,
        architecture=ARCHITECTURE_TITLES.get(results.model, results.model),
        backbone=results.backbone,
        output_stride=_or_unknown(results.output_stride),
        pretrained_backbone={True: "yes", False: "no"}.get(results.pretrained_backbone, "unknown"),
        dataset=results.dataset,
        split=results.split,
        hub_dataset=_hub_dataset_rows(results),
        selection_figure=SELECTION_FIGURE_IN_REPO if final_card and selection_figure(results) else None,
        final_note=final_model_note(results).replace("final/", "The final model (`final/`, on `main`)"),
        figures=[
            {"title": text, "path": results.figures[name]}
            for name, text in FIGURE_TITLES.items()
            if final_card and name in (results.figures or {})
        ],
        label_next=_label_next_rows(results) if final_card else None,
        comparison=_comparison_rows(comparison) if final_card and comparison is not None else None,
        num_labeled=results.num_labeled,
        num_unlabeled=results.num_unlabeled,
        epochs=_or_unknown(results.epochs),
        global_batch_size=_or_unknown(results.global_batch_size),
        lr=_or_unknown(results.lr),
        crop_size=_or_unknown(results.crop_size),
        hardware=_or_unknown(results.hardware),
        precision=_precision_text(results),
        wall_time=_format_wall_time(results.wall_time_s),
        miou_rows=miou_rows,
        pseudo_label_rows=pseudo_label_rows,
        iou_columns=iou_columns,
        iou_rows=iou_rows,
        run_config=json_text(results.config, "the run config", indent=2) if results.config is not None else None,
    )


def _label_next_rows(results: RunResults) -> dict | None:
    """The card's "label next" section: the least reliable images of the ST++ selection and their contact sheet."""
    if results.label_next is None:
        return None
    rows = [
        {"rank": rank, "id": image["id"], "reliability": f"{image['reliability']:.4f}"}
        for rank, image in enumerate(results.label_next["images"], start=1)
    ]
    return {"rows": rows, "figure": results.label_next["figure"], "count": len(rows)}


def _comparison_rows(comparison) -> dict:
    """The card's aggregate section: mean ± std, min, max, n per stage of a :class:`~stpp_hf.compare.Comparison`."""
    from .compare import mean_std_cell  # a card without a comparison does not load the comparison's modules

    rows = [
        {
            "name": row["title"],
            "mean_std": mean_std_cell(row),
            "min": _percent_cell(row["min"]),
            "max": _percent_cell(row["max"]),
            "n": row["n"],
        }
        for row in comparison.rows
    ]
    return {"noun": comparison.noun, "header": comparison.header(), "rows": rows, "figure": COMPARISON_FIGURE_IN_REPO}


def _dataset_ids(results: RunResults) -> list[str] | None:
    """The card's `datasets` metadata: the Hub dataset a run trained on, or the name of a known dataset."""
    if results.hub_dataset is not None:
        return [results.hub_dataset["dataset_name"]]
    return [results.dataset] if results.dataset != "synthetic" else None


def _hub_dataset_rows(results: RunResults) -> list[dict]:
    """Training-setup rows naming the `datasets` dataset, its columns and the labeled / unlabeled partition."""
    hub = results.hub_dataset
    if hub is None:
        return []
    partition = hub["partition"]
    amount = (
        f"{partition['num_labeled']} rows"
        if partition["num_labeled"] is not None
        else f"fraction {partition['labeled_fraction']}"
    )
    return [
        {
            "name": "Hub dataset",
            "value": f"`{hub['dataset_name']}`"
            + (f" (config `{hub['dataset_config']}`)" if hub["dataset_config"] else ""),
        },
        {"name": "Columns (image / label)", "value": f"`{hub['image_column']}` / `{hub['label_column']}`"},
        {"name": "Splits (train / val)", "value": f"`{hub['train_split']}` / `{hub['val_split']}`"},
        {
            "name": "Labeled partition",
            "value": f"{amount} of {partition['num_rows']} train rows, seed {partition['partition_seed']}",
        },
    ]


__all__ = [
    "DEFAULT_LICENSE",
    "build_model_card",
    "card_files",
    "eval_result_files",
    "framework_title",
    "selection_figure",
    "stage_branch_name",
]
