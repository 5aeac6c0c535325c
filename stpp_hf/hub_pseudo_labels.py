"""Push a finished run's pseudo labels to the Hub as a dataset repo with a dataset card.

`push_pseudo_labels(run_dir, repo_id)` pushes :func:`~stpp_hf.training.pseudo_label_export.pseudo_label_dataset`
with `datasets`' own `push_to_hub` (parquet shards, the images and labels embedded), then replaces the
generated README with a card that names the teacher of each subset and the pseudo labels' mIoU where the
unlabeled images have true masks.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import DatasetCard
from huggingface_hub.errors import HfHubHTTPError

from .hub import HubPushError
from .model_card import framework_title
from .training.pseudo_label_export import pseudo_label_dataset
from .training.results import RunResults

CARD_TEMPLATE_PATH = Path(__file__).parent / "hub_cards" / "pseudo_labels_card.md"


def pseudo_label_card_values(results: RunResults, dataset) -> dict:
    """The template values of the card: one row per subset (rows, teacher, mIoU)."""
    subset_rows = []
    subsets, teachers = list(dataset["subset"]), list(dataset["teacher"])
    for subset in dict.fromkeys(subsets):
        miou = results.pseudo_label_miou.get(subset)
        subset_rows.append(
            {
                "subset": subset,
                "rows": subsets.count(subset),
                "teacher": teachers[subsets.index(subset)],
                "miou": "n/a (no true masks)" if miou is None else f"{100 * miou:.2f}",
            }
        )
    return {
        "framework_title": framework_title(results),
        "num_rows": len(dataset),
        "dataset": results.dataset,
        "split": results.split,
        "subset_rows": subset_rows,
        "class_names": ", ".join(f"{index} {name}" for index, name in enumerate(results.class_names())),
    }


def push_pseudo_labels(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    unlabeled=None,
) -> str:
    """Push the pseudo labels of the finished run in `run_dir` to the dataset repo `repo_id` (created if needed).

    Returns:
        The dataset repo's URL.

    Raises:
        HubPushError: the Hub refused or failed a request (the run directory is only read).
    """
    run_dir = Path(run_dir)
    results = RunResults.read(run_dir)
    dataset = pseudo_label_dataset(run_dir, unlabeled)
    try:
        commit = dataset.push_to_hub(
            repo_id, private=private, token=token, commit_message="Pseudo labels of an stpp_hf run"
        )
        generated = DatasetCard.load(repo_id, repo_type="dataset", token=token)
        card = DatasetCard.from_template(
            generated.data, template_path=CARD_TEMPLATE_PATH, repo_id=repo_id,
            title=f"{repo_id.split('/')[-1]}: pseudo labels", **pseudo_label_card_values(results, dataset),
        )  # fmt: skip
        card.push_to_hub(repo_id, repo_type="dataset", token=token, commit_message="Dataset card")
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no response"
        raise HubPushError(
            f"Pushing the pseudo labels of {run_dir} to dataset {repo_id} failed (HTTP {status}): {error}"
        ) from error
    return str(commit.repo_url)


__all__ = ["push_pseudo_labels", "pseudo_label_card_values"]
