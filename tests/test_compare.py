"""stpp-compare: finished runs (results.json written through RunResults) aggregated, incomparable ones refused."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
from PIL import Image

from stpp_hf.compare import IncomparableRunsError, compare_runs
from stpp_hf.training.plots import FIGURE_SIZES
from stpp_hf.training.results import FinalSummary, RunResults, StageSummary

CLASSES = {"0": "background", "1": "disc", "2": "box"}
STAGE_NAMES = ("suponly", "retrain_reliable", "retrain_all")
VAL = {"fingerprint": "val-fingerprint", "num_images": 6}


def write_run(run_dir, seed, mious, class_iou, **changes):
    """A finished ST++-like run in ``run_dir``: val mIoU ``mious`` per training stage (the last one is also the
    final model's) and per-class IoU ``class_iou`` per stage; ``changes`` override results or config fields."""
    config = {"framework": "stpp", "seed": seed, "epochs": 3, "output_dir": str(run_dir), "num_workers": 0}
    config["data"] = {"val": dict(VAL), "labeled": {"fingerprint": "labeled", "num_images": 8}}
    overrides = changes.pop("config", {})
    config = None if overrides is None else {**config, **overrides}
    stages = []
    for index, (name, miou, table) in enumerate(zip(STAGE_NAMES, mious, class_iou)):
        stages.append(
            StageSummary(
                name=name,
                kind="train",
                val_miou=miou,
                per_class_iou=dict(zip(CLASSES.values(), table)),
                best_epoch=2,
                model_dir=f"stages/{index}-{name}/best",
            )
        )
        stages.append(StageSummary(name=f"label_{index}", kind="label", num_images=4))
    fields = dict(
        framework="stpp", num_labeled=8, num_unlabeled=12, id2label=dict(CLASSES), stages=tuple(stages),
        final=FinalSummary(val_miou=mious[-1], per_class_iou=dict(zip(CLASSES.values(), class_iou[-1])),
                           model_dir="final"),
        config=config, dataset="synthetic", split="synthetic", model="deeplabv3plus", backbone="resnet18",
    )  # fmt: skip
    fields.update(changes)
    RunResults(**fields).write(run_dir)
    return run_dir


@pytest.fixture
def three_seeds(tmp_path):
    rng = np.random.default_rng(7)
    run_dirs = []
    for seed in range(3):
        mious = rng.uniform(0.3, 0.6, size=3).tolist()
        class_iou = rng.uniform(0.1, 0.9, size=(3, 3)).tolist()
        class_iou[0][2] = None if seed == 1 else class_iou[0][2]  # a class one run's val set lacks
        run_dirs.append(write_run(tmp_path / f"seed{seed}", seed, mious, class_iou))
    return run_dirs


def read_results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def independent_stats(values):
    values = np.array([value for value in values if value is not None], dtype=float)
    return {
        "n": len(values),
        "mean": values.mean(),
        "std": values.std(ddof=1) if len(values) > 1 else None,
        "min": values.min(),
        "max": values.max(),
    }


def assert_stats(actual, expected):
    assert actual["n"] == expected["n"]
    for key in ("mean", "std", "min", "max"):
        if expected[key] is None:
            assert actual[key] is None
        else:
            assert actual[key] == pytest.approx(expected[key], rel=1e-12)


def test_aggregate_equals_numbers_computed_from_the_results_files(three_seeds):
    comparison = compare_runs(three_seeds)
    files = [read_results(run_dir) for run_dir in three_seeds]
    trained = [[stage for stage in data["stages"] if stage["kind"] == "train"] for data in files]
    for position, name in enumerate(STAGE_NAMES):
        row = comparison.row(name)
        values = [stages[position]["val_miou"] for stages in trained]
        assert row["values"] == values
        assert_stats(row, independent_stats(values))
        for class_name in CLASSES.values():
            class_values = [stages[position]["per_class_iou"][class_name] for stages in trained]
            assert_stats(comparison.per_class_iou[class_name][row["title"]], independent_stats(class_values))
    assert_stats(comparison.row("final"), independent_stats([data["final"]["val_miou"] for data in files]))
    assert comparison.per_class_iou["box"][comparison.row("suponly")["title"]]["n"] == 2  # the None is left out
    # the number of runs in which a stage scored lower than the stage before it
    lower = sum(stages[2]["val_miou"] < stages[1]["val_miou"] for stages in trained)
    assert comparison.row("retrain_all")["lower_than_previous"] == lower
    assert comparison.row("suponly")["lower_than_previous"] is None


def test_header_names_the_differing_settings_only(three_seeds):
    comparison = compare_runs(three_seeds)
    assert comparison.differences == {"seed": [0, 1, 2]}  # output_dir / num_workers cannot change results
    assert comparison.labels == ("seed 0", "seed 1", "seed 2")
    assert comparison.noun == "3 seeds"
    header = comparison.header()
    assert "seed (0, 1, 2)" in header and "sample standard deviation (ddof=1)" in header
    markdown = comparison.to_markdown()
    row = comparison.row("suponly")
    expected = f"| 1 SupOnly | {' | '.join(f'{100 * value:.2f}' for value in row['values'])} | "
    expected += f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} | "
    assert expected in markdown
    assert "| box |" in markdown and "(2 runs)" in markdown


@pytest.mark.parametrize(
    "change, named",
    [
        ({"backbone": "resnet50"}, "backbone"),
        ({"dataset": "pascal"}, "dataset"),
        ({"framework": "st"}, "framework"),
        ({"id2label": {"0": "background", "1": "disc", "2": "cross"}}, "classes"),
        ({"config": {"data": {"val": {"fingerprint": "other-val", "num_images": 6}}}}, "val set"),
    ],
)
def test_incomparable_runs_are_refused_with_the_difference_named(three_seeds, tmp_path, change, named):
    other = write_run(tmp_path / "other", 5, [0.4, 0.5, 0.45], [[0.5] * 3] * 3, **change)
    with pytest.raises(IncomparableRunsError, match=f"another {named} are not comparable") as error:
        compare_runs([*three_seeds, other])
    assert str(other) in str(error.value)


def test_a_run_given_twice_is_refused(three_seeds):
    with pytest.raises(ValueError, match="given twice"):
        compare_runs([three_seeds[0], three_seeds[1], three_seeds[0]])


def test_runs_without_a_recorded_configuration_compare_on_their_description(tmp_path):
    runs = [
        write_run(tmp_path / f"run{index}", index, [0.4, 0.5, 0.6], [[0.5] * 3] * 3, config=None, split=split)
        for index, split in enumerate(["1_16/split_0", "1_16/split_1"])
    ]
    assert all("config" not in read_results(run) for run in runs)  # as an older results.json
    comparison = compare_runs(runs)
    assert comparison.differences == {"split": ["1_16/split_0", "1_16/split_1"]}
    assert comparison.noun == "2 splits" and not comparison.recorded_configs
    assert "no recorded configuration" in comparison.header()


def test_single_run_has_no_standard_deviation(three_seeds):
    comparison = compare_runs(three_seeds[:1])
    assert comparison.row("final")["std"] is None and comparison.row("final")["n"] == 1
    assert math.isclose(comparison.row("final")["mean"], read_results(three_seeds[0])["final"]["val_miou"])


def test_console_script_writes_markdown_json_and_the_picture(three_seeds, tmp_path):
    output = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "stpp_hf.compare", *map(str, three_seeds), "--output-dir", str(output)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    comparison = compare_runs(three_seeds)
    assert (output / "comparison.md").read_text() == comparison.to_markdown()
    assert comparison.to_markdown() in completed.stdout
    saved = json.loads((output / "comparison.json").read_text())
    assert saved["std"] == "sample standard deviation (ddof=1)"
    assert [row["mean"] for row in saved["rows"]] == [row["mean"] for row in comparison.rows]
    with Image.open(output / "comparison.png") as picture:
        assert picture.format == "PNG" and picture.size == FIGURE_SIZES["comparison"]
    refused = subprocess.run(
        [sys.executable, "-m", "stpp_hf.compare", str(three_seeds[0]), str(tmp_path / "missing"), "--output-dir",
         str(output)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "stpp-compare: error:" in refused.stderr and "missing" in refused.stderr


def test_synthetic_runs_compare_on_the_settings_that_generate_their_data(tmp_path):
    # each run generates the synthetic data in its own directory: the file fingerprints differ, the data does not
    synthetic = {"seed": 0, "num_labeled": 8, "num_unlabeled": 12, "num_val": 6, "image_size": 32}
    runs = []
    for seed in range(2):
        data = {"val": {"fingerprint": f"val-{seed}", "num_images": 6}, "labeled": {"fingerprint": f"l-{seed}"}}
        config = {"synthetic": synthetic, "data": data}
        runs.append(write_run(tmp_path / f"seed{seed}", seed, [0.4, 0.5, 0.6], [[0.5] * 3] * 3, config=config))
    comparison = compare_runs(runs)
    assert comparison.differences == {"seed": [0, 1]} and comparison.noun == "2 seeds"
    other = {"synthetic": {**synthetic, "num_val": 12}, "data": {"val": {"fingerprint": "v", "num_images": 12}}}
    runs.append(write_run(tmp_path / "other", 2, [0.4, 0.5, 0.6], [[0.5] * 3] * 3, config=other))
    with pytest.raises(IncomparableRunsError, match="another val set are not comparable"):
        compare_runs(runs)
