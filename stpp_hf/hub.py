"""Push trained models to the Hugging Face Hub as self-describing repos with a rendered model card.

`push_run_to_hub(run_dir, repo_id)` pushes a run's `final/` model (weights, config, image processor and the
remote-code files written by `save_pretrained`) with a card rendered from `results.json` (format in
ARCHITECTURE.md); `push_stages=True` also pushes each training stage's best model to its own branch.
`push_model_dir` pushes any `save_pretrained` directory. Tokens come from huggingface_hub's usual sources
(`token=`, `HF_TOKEN`, `hf auth login`) and are never printed or written anywhere.
"""

import json
import math
import os
import re
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its transport errors are an unreachable Hub
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

CARD_TEMPLATE_PATH = Path(__file__).parent / "hub_cards" / "stpp_model_card.md"  # links to the root hub_cards/
RESULTS_FILE = "results.json"
FRAMEWORK_TITLES = {
    "suponly": "SupOnly (labeled images only)",
    "st": "ST (self-training)",
    "stpp": "ST++ (self-training)",
}
ARCHITECTURE_TITLES = {"deeplabv3plus": "DeepLabV3+", "deeplabv2": "DeepLabV2"}
REQUIRED_RESULT_FIELDS = (
    "framework", "dataset", "split", "num_labeled", "num_unlabeled", "model", "backbone", "id2label", "stages",
    "final",
)  # fmt: skip
PAPER_URL = "https://arxiv.org/abs/2106.05095"
SELECTION_FIGURE_IN_REPO = "selection.png"  # the ST++ selection picture, uploaded next to the final model
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


# the package's own license (pyproject.toml), the default of the cards it writes
DEFAULT_LICENSE = "apache-2.0"


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local files were only read, never changed."""


def load_run_results(run_dir: str | os.PathLike) -> dict:
    """Read and check a run's `results.json` (the trainer writes it when a run finishes)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run directory?")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    missing = [field for field in REQUIRED_RESULT_FIELDS if field not in results]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}")
    for index, stage in enumerate(results["stages"]):
        if stage.get("kind") == "train" and not {"name", "val_miou", "per_class_iou", "model_dir"} <= stage.keys():
            raise ValueError(f"{path}: training stage {index} must have name, val_miou, per_class_iou and model_dir")
    if not {"val_miou", "per_class_iou", "model_dir"} <= results["final"].keys():
        raise ValueError(f"{path}: 'final' must have val_miou, per_class_iou and model_dir")
    return results


def stage_branch_name(index: int, stage: dict) -> str:
    """`"stage-1-suponly"` for the first stage: the branch a stage's best model is pushed to (index from 0)."""
    return f"stage-{index + 1}-{stage['name']}"


def training_stages(results: dict) -> list[tuple[int, dict]]:
    """(position in `results["stages"]`, stage) of the stages that train a model, in run order."""
    return [(index, stage) for index, stage in enumerate(results["stages"]) if stage.get("kind") == "train"]


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


def _backbone_weights_hub_id(results: dict) -> str | None:
    """The Hub repo (`owner/name[@revision]`) the backbone's weights came from, or None: read from the resolved
    `backbone_weights` setting, the dict of `stpp_hf.models.backbone_weights.describe_backbone_weights`."""
    weights = results.get("backbone_weights", {})
    if not isinstance(weights, dict):
        raise ValueError(
            f"results.json: backbone_weights must be the dict of describe_backbone_weights "
            f"(spec, kind, hub_id, path), got {weights!r}"
        )
    return weights.get("hub_id")


def build_model_card(
    results: dict,
    repo_id: str,
    *,
    stage_index: int | None = None,
    license: str = DEFAULT_LICENSE,
    template_path: str | os.PathLike = CARD_TEMPLATE_PATH,
) -> ModelCard:
    """Render the model card of a run from its `results.json` content.

    Args:
        results: the parsed `results.json` (see `load_run_results`).
        repo_id: the Hub repo the card describes (used in the loading snippets).
        stage_index: None for the card of the final model (on `main`); the position of a training stage in
            `results["stages"]` for the card of that stage's branch.
        license: the license metadata of the repo.
        template_path: the Jinja2 template (`hub_cards/stpp_model_card.md`).

    Returns:
        A `ModelCard` whose metadata hold library name, tags, datasets, license, `base_model` (the Hub repo of the
        backbone's initial weights, from `results["backbone_weights"]["hub_id"]`; absent when they came
        from no Hub repo) and a `model-index` with the val mIoU (%) of the model in this revision first, then (final
        card only) each training stage.
    """
    if not Path(template_path).is_file():
        raise FileNotFoundError(
            f"model card template {template_path} not found (it ships as stpp_hf/hub_cards/); "
            "pass template_path= to use another"
        )
    framework_title = FRAMEWORK_TITLES.get(results["framework"], results["framework"])
    dataset = results["dataset"]
    stages = training_stages(results)

    def eval_result(metric_name: str, miou: float) -> EvalResult:
        return EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset,
            dataset_name=f"{dataset} ({results['split']})",
            dataset_split="val",
            metric_type="mean_iou",
            metric_name=metric_name,
            metric_value=_percent(miou),
        )

    if stage_index is None:
        revision, revision_note = None, None
        eval_results = [eval_result("val mIoU (%), final model", results["final"]["val_miou"])]
        eval_results += [
            eval_result(f"val mIoU (%), stage {index + 1} {stage['name']}", stage["val_miou"])
            for index, stage in stages
        ]
    else:
        stage = results["stages"][stage_index]
        if stage.get("kind") != "train":
            raise ValueError(f"stage {stage_index} ({stage.get('name')!r}) trains no model, so it has no card")
        revision = stage_branch_name(stage_index, stage)
        revision_note = (
            f"This branch (`{revision}`) holds the best-on-val model of stage {stage_index + 1} ({stage['name']}). "
            f"The final {framework_title} model is on `main`."
        )
        eval_results = [eval_result(f"val mIoU (%), stage {stage_index + 1} {stage['name']}", stage["val_miou"])]

    architecture = ARCHITECTURE_TITLES.get(results["model"], results["model"])
    model_name = repo_id.split("/")[-1] + (f" ({revision})" if revision else "")
    backbone_hub_id = _backbone_weights_hub_id(results)
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=license,
        datasets=_dataset_ids(results),
        tags=[
            "semantic-segmentation",
            "semi-supervised",
            "self-training",
            "stpp",
            results["model"],
            results["backbone"],
        ],
        metrics=["mean_iou"],
        eval_results=eval_results,
        backbone=results["backbone"],
        base_model=backbone_hub_id.partition("@")[0] if backbone_hub_id else None,  # a repo id, without @revision
        paper=PAPER_URL,
    )

    iou_columns = [f"stage {index + 1} {stage['name']}" for index, stage in stages] + ["final"]
    per_class = [stage["per_class_iou"] for _, stage in stages] + [results["final"]["per_class_iou"]]
    class_names = [results["id2label"][key] for key in sorted(results["id2label"], key=int)]
    iou_rows = [
        {"name": name, "cells": [_percent_cell(table[name]) if name in table else "-" for table in per_class]}
        for name in class_names
    ]
    miou_rows = [
        {"name": column, "miou": _percent_cell(stage["val_miou"])} for column, (_, stage) in zip(iou_columns, stages)
    ]
    miou_rows.append({"name": f"final model, {framework_title}", "miou": _percent_cell(results["final"]["val_miou"])})
    pseudo_label_rows = [
        {"name": f"{subset} images, TTA labels of their stage's teacher", "miou": _percent_cell(miou)}
        for subset, miou in results.get("pseudo_label_miou", {}).items()
        if miou is not None
    ]
    # ST++ selection check: one teacher (SupOnly, no TTA) for both subsets, so they compare
    pseudo_label_rows += [
        {"name": f"{subset} images, SupOnly teacher without TTA", "miou": _percent_cell(miou)}
        for stage in results["stages"]
        for subset, miou in (stage.get("teacher_miou") or {}).items()
    ]
    return ModelCard.from_template(
        card_data,
        template_path=template_path,
        repo_id=repo_id,
        title=model_name,
        revision_argument=f', revision="{revision}"' if revision else "",
        revision_note=revision_note,
        framework_title=framework_title,
        architecture=architecture,
        backbone=results["backbone"],
        output_stride=results.get("output_stride", "unknown"),
        pretrained_backbone={True: "yes", False: "no"}.get(results.get("pretrained_backbone"), "unknown"),
        dataset=dataset,
        split=results["split"],
        hub_dataset=_hub_dataset_rows(results),
        selection_figure=SELECTION_FIGURE_IN_REPO if stage_index is None and selection_figure(results) else None,
        num_labeled=results["num_labeled"],
        num_unlabeled=results["num_unlabeled"],
        epochs=results.get("epochs", "unknown"),
        batch_size=results.get("batch_size", "unknown"),
        lr=results.get("lr", "unknown"),
        crop_size=results.get("crop_size", "unknown"),
        hardware=results.get("hardware", "unknown"),
        wall_time=_format_wall_time(results.get("wall_time_s")),
        miou_rows=miou_rows,
        pseudo_label_rows=pseudo_label_rows,
        iou_columns=iou_columns,
        iou_rows=iou_rows,
        run_config=json.dumps(results["config"], indent=2) if "config" in results else None,
    )


def selection_figure(results: dict) -> str | None:
    """The run-directory path of the ST++ selection picture (`selection.png` of the select stage), if any."""
    return next((stage["figure"] for stage in results["stages"] if stage.get("figure")), None)


def _dataset_ids(results: dict) -> list[str] | None:
    """The card's `datasets` metadata: the Hub dataset a run trained on, or the name of a known dataset."""
    if "hub_dataset" in results:
        return [results["hub_dataset"]["dataset_name"]]
    return [results["dataset"]] if results["dataset"] != "synthetic" else None


def _hub_dataset_rows(results: dict) -> list[dict]:
    """Training-setup rows naming the `datasets` dataset, its columns and the labeled / unlabeled partition."""
    hub = results.get("hub_dataset")
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


def _model_files(model_dir: Path) -> list[Path]:
    """The files of a `save_pretrained` directory to upload, after checking that it can be loaded from the Hub."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {model_dir} is not a save_pretrained directory")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    # Remote code: every module named in an auto_map must travel with the weights.
    auto_maps = [json.loads(config_path.read_text()).get("auto_map", {})]
    processor_path = model_dir / "preprocessor_config.json"
    if processor_path.is_file():
        auto_maps.append(json.loads(processor_path.read_text()).get("auto_map", {}))
    pending = [
        class_reference.split("--")[-1].rsplit(".", 1)[0]
        for auto_map in auto_maps
        for reference in auto_map.values()
        for class_reference in ([reference] if isinstance(reference, str) else reference)
        if class_reference is not None
    ]
    checked = set()
    while pending:  # the auto_map modules and the modules they import relatively (`from .x import`)
        module = pending.pop()
        module_file = model_dir / f"{module}.py"
        if not module_file.is_file():
            raise FileNotFoundError(f"{module_file} (remote code the saved model needs) is missing from {model_dir}")
        checked.add(module)
        pending += [name for name in RELATIVE_IMPORT.findall(module_file.read_text()) if name not in checked]
    # Hidden files and temporaries of an interrupted save stay local.
    return sorted(
        path
        for path in model_dir.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") or part.endswith(".tmp") for part in path.relative_to(model_dir).parts)
    )


def push_model_dir(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    extra_files: dict[str, Path] | None = None,
) -> str:
    """Push a `save_pretrained` directory (and a model card as `README.md`) to a Hub model repo in one commit.

    `extra_files` maps paths in the repo to local files uploaded in the same commit (e.g. a card's images).

    The repo is created if needed (`private` only applies then); a `revision` other than `main` is a branch,
    created from `main` if it does not exist. The local directory is only read.

    Returns:
        The repo URL.

    Raises:
        FileNotFoundError: `model_dir` is not a loadable `save_pretrained` directory.
        HubPushError: the Hub refused or failed a request (status and server message included).
    """
    model_dir = Path(model_dir)
    files = _model_files(model_dir)
    operations = [
        CommitOperationAdd(path.relative_to(model_dir).as_posix(), str(path))
        for path in files
        if card is None or path.relative_to(model_dir).as_posix() != "README.md"  # the card replaces a local one
    ]
    if card is not None:
        operations.append(CommitOperationAdd("README.md", str(card).encode()))
    operations += [CommitOperationAdd(name, str(path)) for name, path in (extra_files or {}).items()]
    api = HfApi(token=token)
    target = f"{repo_id}@{revision or 'main'}"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {model_dir.name} ({len(files)} files) with stpp_hf",
            revision=revision,
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no response"
        if status in (401, 403):
            advice = (
                f"the Hub refused the token; log in with `hf auth login` (or set HF_TOKEN) using a token with write "
                f"access to {repo_id}, then push again"
            )
        else:
            advice = "push again once the Hub answers"
        raise HubPushError(
            f"Pushing {model_dir} to {target} failed (HTTP {status}): {error}. Nothing local was changed; {advice}."
        ) from error
    except httpx2.TransportError as error:
        raise HubPushError(
            f"Pushing {model_dir} to {target} failed: the Hub at {api.endpoint} cannot be reached "
            f"({type(error).__name__}: {error}). Nothing local was changed; check the network (and HF_ENDPOINT if "
            "you set it), then push again."
        ) from None
    return str(repo_url)


def push_run_to_hub(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    push_stages: bool = False,
    token: str | bool | None = None,
    license: str = DEFAULT_LICENSE,
) -> str:
    """Push a finished run's final model with its model card; `push_stages=True` also pushes each training
    stage's best model (with its own card) to the branch `stage-<n>-<name>`, e.g. `stage-1-suponly`.

    Args:
        run_dir: the trainer's run directory (holds `results.json`, `final/` and `stages/`).
        repo_id: "user/name" of the model repo (created if needed).
        private: create the repo private.
        revision: branch of the final model (default `main`).
        commit_message: message of the final model's commit.
        push_stages: also push the stage branches.
        token: a Hub token; None takes huggingface_hub's usual sources (HF_TOKEN, saved login).
        license: license metadata of the card.

    Returns:
        The repo URL.
    """
    run_dir = Path(run_dir)
    results = load_run_results(run_dir)
    # Check every directory before the first upload, so a bad run fails before the Hub changes.
    stage_dirs = (
        {index: run_dir / stage["model_dir"] for index, stage in training_stages(results)} if push_stages else {}
    )
    for model_dir in [run_dir / results["final"]["model_dir"], *stage_dirs.values()]:
        _model_files(model_dir)
    figure = selection_figure(results)
    if figure is not None and not (run_dir / figure).is_file():
        raise FileNotFoundError(f"{run_dir / figure} (the selection picture results.json names) is missing")
    repo_url = push_model_dir(
        run_dir / results["final"]["model_dir"],
        repo_id,
        card=build_model_card(results, repo_id, license=license),
        private=private,
        revision=revision,
        commit_message=commit_message
        or f"{FRAMEWORK_TITLES.get(results['framework'], results['framework'])} final model",
        token=token,
        extra_files=None if figure is None else {SELECTION_FIGURE_IN_REPO: run_dir / figure},
    )
    for index, model_dir in stage_dirs.items():
        stage = results["stages"][index]
        push_model_dir(
            model_dir,
            repo_id,
            card=build_model_card(results, repo_id, stage_index=index, license=license),
            revision=stage_branch_name(index, stage),
            commit_message=f"Stage {index + 1} ({stage['name']}) best model",
            token=token,
        )
    return repo_url


__all__ = [
    "HubPushError",
    "build_model_card",
    "load_run_results",
    "push_model_dir",
    "push_run_to_hub",
    "stage_branch_name",
]
