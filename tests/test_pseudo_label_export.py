"""A finished run's pseudo labels as a ``datasets.Dataset``, pushed to and loaded from the fake Hub."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fake_hub import FakeHub
from helpers import REPO
from huggingface_hub import DatasetCard

from stpp_hf.data import PseudoLabelStore, load_source, make_synthetic_dataset
from stpp_hf.training.pseudo_label_export import pseudo_label_dataset, record_unlabeled_source

TEACHERS = {
    "label_reliable": ("stages/1-suponly/best", "a1" * 32),
    "label_unreliable": ("stages/4-retrain_reliable/best", "b2" * 32),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An ST++ run directory as the pipeline leaves it: results.json, reliability scores and two pseudo-label
    stores."""
    run_dir = tmp_path_factory.mktemp("run")
    data = make_synthetic_dataset(
        run_dir / "synthetic_data", seed=0, num_labeled=3, num_unlabeled=6, num_val=2, image_size=32
    )
    record_unlabeled_source(
        run_dir,
        {
            "kind": "local",
            "source": "pascal",
            "root": str(data.root),
            "split_file": str(data.split_files["unlabeled"]),
        },
    )
    unlabeled = load_source("pascal", data.root, data.split_files["unlabeled"], cache_dir=run_dir / "datasets_cache")
    ids = list(unlabeled["id"])
    scores = {image_id: 0.9 - 0.1 * index for index, image_id in enumerate(ids)}
    (run_dir / "stages" / "2-select").mkdir(parents=True)
    (run_dir / "stages" / "2-select" / "reliability.json").write_text(json.dumps(scores))
    subsets = {"label_reliable": ("reliable", ids[:3]), "label_unreliable": ("unreliable", ids[3:])}
    rng = np.random.default_rng(0)
    labels, label_stages = {}, {}
    for stage, (subset, subset_ids) in subsets.items():
        teacher, fingerprint = TEACHERS[stage]
        store = PseudoLabelStore.for_teacher(run_dir / "pseudo_labels", fingerprint, stage, palette=data.palette)
        for image_id in subset_ids:
            labels[image_id] = rng.integers(0, len(data.id2label), size=(32, 32), dtype=np.uint8)
            store.put(image_id, labels[image_id])
        store.verify(subset_ids)
        label_stages[stage] = {"name": stage, "kind": "label", "subset": subset, "num_images": 3, "teacher": teacher,
                               "pseudo_label_miou": 0.61 if subset == "reliable" else None,
                               "store_dir": store.directory.relative_to(run_dir).as_posix()}  # fmt: skip
    train = {"kind": "train", "val_miou": 0.5, "per_class_iou": {}, "best_epoch": 1, "model_dir": "x"}
    stages = [
        {"name": "suponly", **train}, {"name": "select", "kind": "select", "num_reliable": 3, "num_unreliable": 3},
        label_stages["label_reliable"], {"name": "retrain_reliable", **train}, label_stages["label_unreliable"],
        {"name": "retrain_all", **train},
    ]  # fmt: skip
    results = {"framework": "stpp", "dataset": "synthetic", "split": "synthetic", "num_labeled": 3, "num_unlabeled": 6,
               "model": "deeplabv3plus", "backbone": "resnet18",
               "id2label": {str(k): v for k, v in data.id2label.items()},
               "stages": stages, "final": {"val_miou": 0.5, "per_class_iou": {}, "model_dir": "final"},
               "pseudo_label_miou": {"reliable": 0.61, "unreliable": None}}  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results))
    return {"run_dir": run_dir, "unlabeled": unlabeled, "labels": labels, "scores": scores, "ids": ids}


def test_rows_hold_image_pseudo_label_score_subset_and_teacher(finished_run):
    dataset = pseudo_label_dataset(finished_run["run_dir"])
    assert list(dataset.features) == ["id", "image", "pseudo_label", "reliability", "subset", "teacher"]
    assert list(dataset["id"]) == finished_run["ids"]
    for position, row in enumerate(dataset):
        image_id = row["id"]
        assert np.array_equal(np.asarray(row["pseudo_label"]), finished_run["labels"][image_id])
        assert row["pseudo_label"].mode == "P"
        assert np.array_equal(np.asarray(row["image"]), np.asarray(finished_run["unlabeled"][position]["image"]))
        assert row["reliability"] == pytest.approx(finished_run["scores"][image_id])
        stage = "label_reliable" if position < 3 else "label_unreliable"
        assert row["subset"] == ("reliable" if position < 3 else "unreliable")
        assert row["teacher"] == f"{TEACHERS[stage][0]} (sha256 {TEACHERS[stage][1][:16]})"


def test_a_damaged_store_is_named(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run["run_dir"], run_dir)
    store = next((run_dir / "pseudo_labels").glob("label_unreliable-*"))
    victim = sorted((store / "labels").iterdir())[0]
    victim.write_bytes(b"not a png")
    with pytest.raises(
        ValueError, match=f"pseudo-label store {store} holds 2 intact labels, stage 'label_unreliable' wrote 3"
    ):
        pseudo_label_dataset(run_dir, finished_run["unlabeled"])


LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from datasets import load_dataset

    pseudo = load_dataset(sys.argv[1], split="train")
    print(json.dumps({"ids": list(pseudo["id"]), "subsets": list(pseudo["subset"]), "features": list(pseudo.features),
                      "labels": {row["id"]: np.asarray(row["pseudo_label"]).tolist() for row in pseudo}}))
    """
)


@pytest.mark.slow
def test_push_pseudo_labels_and_load_them_back(finished_run, tmp_path):
    with FakeHub() as hub:
        environment = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
                       "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                       "PYTHONPATH": str(REPO)}  # fmt: skip
        environment.pop("HF_HUB_OFFLINE", None)
        push = subprocess.run(
            [sys.executable, str(REPO / "examples/push_to_hub.py"), "--run-dir", str(finished_run["run_dir"]),
             "--pseudo-labels-repo", "tester/stpp-pseudo"],
            env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert push.returncode == 0, push.stderr[-3000:]
        loaded = subprocess.run(
            [sys.executable, "-c", LOADER, "tester/stpp-pseudo"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        card = DatasetCard(hub.files("tester/stpp-pseudo", repo_type="dataset")["README.md"].decode())
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["ids"] == finished_run["ids"] and report["subsets"] == ["reliable"] * 3 + ["unreliable"] * 3
    assert report["features"] == ["id", "image", "pseudo_label", "reliability", "subset", "teacher"]
    for image_id, label in report["labels"].items():
        assert np.array_equal(np.array(label), finished_run["labels"][image_id])
    assert f"| reliable | 3 | `stages/1-suponly/best (sha256 {'a1' * 8})` | 61.00 |" in card.text
    assert (
        "| unreliable | 3 | `stages/4-retrain_reliable/best (sha256" in card.text
        and "n/a (no true masks)" in card.text
    )
    assert 'load_dataset("tester/stpp-pseudo", split="train")' in card.text
    assert card.data.dataset_info is not None or card.data.configs  # datasets' own metadata kept
