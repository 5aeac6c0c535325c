"""Push trained models to the Hugging Face Hub as self-describing repos with a rendered model card.

`push_run_to_hub(run_dir, repo_id)` pushes a run's `final/` model (weights, config, image processor and the
remote-code files written by `save_pretrained`) with the card of :mod:`stpp_hf.model_card`, rendered from the run's
`results.json`, the pictures it embeds and the `.eval_results/*.yaml` entries; `push_stages=True` also pushes each
training stage's best model to its own branch; `comparison_runs` adds the aggregate of the runs the model belongs to.
`push_model_dir` pushes any `save_pretrained` directory. Tokens come from huggingface_hub's usual sources
(`token=`, `HF_TOKEN`, `hf auth login`) and are never printed or written anywhere.
"""

import json
import os
import tempfile
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its transport errors are an unreachable Hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from transformers.dynamic_module_utils import get_relative_import_files

from .model_card import (
    COMPARISON_FIGURE_IN_REPO,
    DEFAULT_LICENSE,
    EVAL_RESULTS_DIR,
    SELECTION_FIGURE_IN_REPO,
    build_model_card,
    card_files,
    eval_result_files,
    framework_title,
    selection_figure,
    stage_branch_name,
)
from .training.divergence import check_finite_model_dir
from .training.results import RunResults


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local files were only read, never changed."""


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
    modules = {
        model_dir / (class_reference.split("--")[-1].rsplit(".", 1)[0] + ".py")
        for auto_map in auto_maps
        for reference in auto_map.values()
        for class_reference in ([reference] if isinstance(reference, str) else reference)
        if class_reference is not None
    }
    missing = next((str(module) for module in sorted(modules) if not module.is_file()), None)
    if missing is None:
        try:  # and the modules they import relatively, found by transformers' own rule (`from .x import`)
            for module in modules:
                get_relative_import_files(module)  # reads each imported file
        except FileNotFoundError as error:
            missing = error.filename
    if missing is not None:
        raise FileNotFoundError(f"{missing} (remote code the saved model needs) is missing from {model_dir}")
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
    extra_files: dict[str, Path | bytes] | None = None,
    replace_folder: str | None = None,
) -> str:
    """Push a `save_pretrained` directory (and a model card as `README.md`) to a Hub model repo in one commit.

    `extra_files` maps paths in the repo to local files (or their bytes) uploaded in the same commit (e.g. a card's
    images). `replace_folder` (a folder in the repo, e.g. `.eval_results`) ends up holding only the files this commit
    uploads into it: the others on the revision (a branch inherits main's) are deleted in the same commit.

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
    operations += [
        CommitOperationAdd(name, content if isinstance(content, bytes) else str(content))
        for name, content in (extra_files or {}).items()
    ]
    api = HfApi(token=token)
    target = f"{repo_id}@{revision or 'main'}"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if replace_folder is not None:
            uploaded = {operation.path_in_repo for operation in operations}
            operations += [
                CommitOperationDelete(path)
                for path in api.list_repo_files(repo_id, revision=revision)
                if path.startswith(f"{replace_folder}/") and path not in uploaded
            ]
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
    comparison_runs: list[str | os.PathLike] | None = None,
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
        comparison_runs: other runs (seeds, splits) this model belongs to: the card shows the aggregate of them and
            this run (:func:`~stpp_hf.compare.compare_runs`; incomparable runs are refused before any upload).

    Returns:
        The repo URL.
    """
    run_dir = Path(run_dir)
    results = RunResults.read(run_dir)
    comparison = None
    if comparison_runs:
        from .compare import compare_runs

        others = [path for path in comparison_runs if Path(path).resolve() != run_dir.resolve()]
        comparison = compare_runs([run_dir, *others])
    # Check every directory and render every card before the first upload, so a bad run fails before the Hub changes.
    final_card = build_model_card(results, repo_id, license=license, comparison=comparison)
    stage_dirs = (
        {index: run_dir / stage.model_dir for index, stage in results.training_stages()} if push_stages else {}
    )
    for model_dir in [run_dir / results.final.model_dir, *stage_dirs.values()]:
        _model_files(model_dir)
        check_finite_model_dir(model_dir)  # a diverged run is not published
    figure = selection_figure(results)
    pictures = {path: run_dir / path for path in card_files(results)}
    if figure is not None:
        pictures[SELECTION_FIGURE_IN_REPO] = run_dir / figure
    missing = next((path for path in pictures.values() if not path.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing} (a picture results.json names) is missing")
    with tempfile.TemporaryDirectory() as scratch:
        if comparison is not None:
            pictures[COMPARISON_FIGURE_IN_REPO] = Path(scratch) / COMPARISON_FIGURE_IN_REPO
            comparison.plot(pictures[COMPARISON_FIGURE_IN_REPO])
        repo_url = push_model_dir(
            run_dir / results.final.model_dir,
            repo_id,
            card=final_card,
            private=private,
            revision=revision,
            commit_message=commit_message or f"{framework_title(results)} final model",
            token=token,
            extra_files={**pictures, **eval_result_files(results)},
            replace_folder=EVAL_RESULTS_DIR,
        )
    for index, model_dir in stage_dirs.items():
        stage = results.stages[index]
        push_model_dir(
            model_dir,
            repo_id,
            card=build_model_card(results, repo_id, stage_index=index, license=license),
            revision=stage_branch_name(index, stage),
            commit_message=f"Stage {index + 1} ({stage.name}) best model",
            token=token,
            extra_files=eval_result_files(results, stage_index=index),
            replace_folder=EVAL_RESULTS_DIR,  # the branch starts as a copy of main, with the final model's entries
        )
    return repo_url


__all__ = ["HubPushError", "push_model_dir", "push_run_to_hub"]
