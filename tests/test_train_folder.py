"""``--dataset folder`` trained from the command line, and a relaunch on other data refused."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, SCRIPT, assert_ok, script_env
from PIL import Image

CLASSES = {"0": "sky", "1": "tree", "2": "house"}


def make_folder_dataset(root, count=14, size=32):
    """``images/``, ``masks/`` (class ids 0..2), ``id2label.json`` and three split files under ``root``."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for index in range(count):
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 2 :] = 1
        mask[:, : size // 3] = 2 * (index % 2)
        image = (np.stack([mask * 90] * 3, axis=-1) + rng.integers(0, 40, (size, size, 3))).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{index:02d}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{index:02d}.png")
        lines.append(f"images/{index:02d}.png masks/{index:02d}.png")
    (root / "id2label.json").write_text(json.dumps(CLASSES))
    splits = {"labeled": lines[:8], "unlabeled": [line.split()[0] for line in lines[8:12]], "val": lines[12:]}
    for part, part_lines in splits.items():
        (root / f"{part}.txt").write_text("\n".join(part_lines) + "\n")


def launch(root, run_dir, splits=None):
    splits = splits or root
    command = [
        sys.executable,
        str(SCRIPT),
        "--dataset",
        "folder",
        "--data_root",
        str(root),
        *(
            arg
            for part in ("labeled", "unlabeled", "val")
            for arg in (f"--{part}_id_path", str(splits / f"{part}.txt"))
        ),
        "--output_dir",
        str(run_dir),
        "--framework",
        "st",
        "--epochs",
        "1",
        "--global_batch_size",
        "4",
        "--backbone",
        "resnet18",
        "--output_stride",
        "16",
        "--backbone_weights",
        "none",
        "--crop_size",
        "32",
        "--base_size",
        "32",
        "--val_batch_size",
        "2",
        "--inference_batch_size",
        "4",
        "--report_to",
        "none",
    ]
    return subprocess.run(command, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_folder_dataset_trains_from_the_command_line_and_other_data_is_refused(tmp_path):
    root, run_dir = tmp_path / "my_data", tmp_path / "run"
    make_folder_dataset(root)
    completed = launch(root, run_dir)
    assert_ok(completed)
    assert "not the method's recipe" in completed.stderr  # a random backbone on real data is said
    results = json.loads((run_dir / "results.json").read_text())
    assert results["id2label"] == CLASSES and results["dataset"] == "folder"
    assert [stage["name"] for stage in results["stages"]] == ["suponly", "label_all", "retrain"]
    assert results["config"]["global_batch_size"] == 4 and results["config"]["data"]["val"]["num_images"] == 2
    assert json.loads((run_dir / "run_config.json").read_text()) == results["config"]

    # the data moved to another root unchanged: the same data, so the finished run resumes (every stage skipped)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(root)
    resumed = launch(copy, run_dir, splits=copy)
    assert_ok(resumed)
    assert resumed.stdout.count("already finished: skipped") == 3, resumed.stdout
    # a replaced val image: refused naming it, before any dataset cache is built
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(copy / "images" / "13.png")
    shutil.rmtree(run_dir / "datasets_cache")
    refused = launch(copy, run_dir, splits=copy)
    assert refused.returncode != 0 and "1 changed (images/13.png)" in refused.stderr
    assert "labeled (" not in refused.stderr and not (run_dir / "datasets_cache").exists()
    results["config"]["data_root"] = str(copy)
    for part in ("labeled", "unlabeled", "val"):
        results["config"][f"{part}_id_path"] = str(copy / f"{part}.txt")
    resumed_results = json.loads((run_dir / "results.json").read_text())
    resumed_results.pop("wall_time_s"), results.pop("wall_time_s")
    assert resumed_results == results  # the resumed run's, on the moved data


@pytest.mark.slow
def test_a_val_set_that_shares_images_with_training_is_refused_before_training(tmp_path):
    root, run_dir = tmp_path / "my_data", tmp_path / "run"
    make_folder_dataset(root)
    splits = tmp_path / "splits"
    splits.mkdir()
    for part in ("labeled", "unlabeled"):
        shutil.copy(root / f"{part}.txt", splits / f"{part}.txt")
    labeled_lines = (root / "labeled.txt").read_text().splitlines()
    (splits / "val.txt").write_text("\n".join(labeled_lines[:2] + (root / "val.txt").read_text().splitlines()) + "\n")
    refused = launch(root, run_dir, splits=splits)
    assert refused.returncode != 0
    assert "the val set (4 images) shares 2 images with the labeled set" in refused.stderr
    assert not (run_dir / "stages").exists()  # nothing trained
