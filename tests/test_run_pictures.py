"""The pictures of a finished run, its images to label next, and the closing table's later-stage-drop mark.

:func:`assert_finished_run_pictures` checks a real finished ST++ run (test_train_e2e calls it on its tiny run); the
tests here draw from results written through RunResults.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stpp_hf.metrics import iou_from_confusion
from stpp_hf.training.label_next import least_reliable, read_label_next_csv
from stpp_hf.training.plots import FIGURE_SIZES, draw_run_figures
from stpp_hf.training.results import FinalSummary, RunResults, StageSummary, results_table
from stpp_hf.training.run_layout import RunLayout
from stpp_hf.training.selection import split_by_reliability
from stpp_hf.training.visualization import contact_sheet_size

PICTURE_SIZES = {
    "val_miou_per_epoch": FIGURE_SIZES["val_miou_per_epoch"],
    "confusion_final": FIGURE_SIZES["confusion"],
    "confusion_suponly": FIGURE_SIZES["confusion"],
    "per_class_iou": FIGURE_SIZES["per_class_iou"],
}


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as picture:
        picture.load()  # decodes the whole file: a truncated one fails here
        assert picture.format == "PNG" and picture.size == size, path


def assert_finished_run_pictures(run_dir: Path, label_next: int) -> None:
    """A finished ST++ run's pictures, confusion matrices and label_next files, checked against its own records."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["figures"] == {name: f"figures/{name}.png" for name in PICTURE_SIZES}
    for name, size in PICTURE_SIZES.items():
        assert_png(run_dir / results["figures"][name], size)
    # the kept confusion matrices are the ones the reported IoUs come from
    suponly = results["stages"][0]
    for summary in (suponly, results["final"]):
        iou = iou_from_confusion(torch.tensor(summary["confusion_matrix"])).tolist()
        reported = [summary["per_class_iou"][name] for name in results["id2label"].values()]
        assert [None if value != value else value for value in iou] == pytest.approx(reported, abs=1e-12)
    # label_next: the selection's ranking (images of its reliable then unreliable split files), read from its end
    select = run_dir / "stages" / "2-select"
    ranking = [
        line.split()[0] for name in ("reliable_ids.txt", "unreliable_ids.txt") for line in (select / name).open()
    ]
    scores = json.loads((select / "reliability.json").read_text())
    rows = read_label_next_csv(run_dir / "label_next.csv")
    expected = ranking[::-1][:label_next]
    assert [row["image"] for row in rows] == expected
    assert [row["rank"] for row in rows] == list(range(1, len(expected) + 1))
    assert [row["reliability"] for row in rows] == [scores[row["id"]] for row in rows]
    assert [row["reliability"] for row in rows] == sorted(row["reliability"] for row in rows)
    assert results["label_next"]["images"] == [
        {key: row[key] for key in ("id", "image", "reliability")} for row in rows
    ]
    assert_png(run_dir / "label_next.png", contact_sheet_size(len(rows)))


def stage(name, miou, history=None, confusion=None):
    return StageSummary(
        name=name, kind="train", val_miou=miou, per_class_iou={"background": 0.9, "disc": miou, "box": None},
        best_epoch=2, model_dir=f"stages/{name}/best", history=history, confusion_matrix=confusion,
    )  # fmt: skip


def run_results(confusion=True, history=True):
    matrix = [[90, 5, 0], [10, 40, 0], [0, 0, 0]] if confusion else None
    epochs = [{"epoch": 1, "loss": 1.0, "val_miou": 0.3}, {"epoch": 2, "loss": 0.8, "val_miou": 0.4}]
    return RunResults(
        framework="stpp", num_labeled=4, num_unlabeled=8, id2label={"0": "background", "1": "disc", "2": "box"},
        stages=(stage("suponly", 0.40, epochs if history else None, matrix),
                StageSummary(name="select", kind="select", num_reliable=4, num_unreliable=4),
                stage("retrain_reliable", 0.47, epochs if history else None, matrix),
                stage("retrain_all", 0.46, epochs if history else None, matrix)),
        final=FinalSummary(val_miou=0.46, per_class_iou={"background": 0.9, "disc": 0.46, "box": None},
                           model_dir="final", confusion_matrix=matrix),
    )  # fmt: skip


def test_every_picture_is_drawn_at_its_stated_size(tmp_path):
    figures = draw_run_figures(run_results(), RunLayout(tmp_path))
    assert figures == {name: f"figures/{name}.png" for name in PICTURE_SIZES}
    for name, size in PICTURE_SIZES.items():
        assert_png(tmp_path / figures[name], size)


def test_an_older_run_without_epochs_or_matrices_gets_the_pictures_it_can(tmp_path):
    results = RunResults.from_json(json.loads(json.dumps(run_results(confusion=False, history=False).to_json())))
    assert results.final.confusion_matrix is None  # an older results.json still reads
    assert draw_run_figures(results, RunLayout(tmp_path)) == {"per_class_iou": "figures/per_class_iou.png"}


def test_confusion_matrix_round_trips_through_results_json(tmp_path):
    results = run_results()
    results.write(tmp_path)
    again = RunResults.read(tmp_path)
    assert again.final.confusion_matrix == results.final.confusion_matrix
    assert again.stages[0].confusion_matrix == results.stages[0].confusion_matrix


def test_label_next_order_equals_the_selection_scores():
    scores = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.5, "e": 0.3, "f": 0.95}
    ids = list(scores)
    reliable, unreliable = split_by_reliability(scores, ids)
    assert least_reliable(scores, ids, 3) == unreliable[::-1][:3] == ["b", "e", "d"]
    assert least_reliable(scores, ids, 10) == (reliable + unreliable)[::-1]
    assert least_reliable(scores, ids, 0) == []


def test_label_next_csv_round_trips(tmp_path):
    from stpp_hf.training.label_next import label_next_rows, write_label_next_csv

    scores = {"x": 0.25, "y": 0.125}
    rows = label_next_rows(scores, ["x", "y"], {"x": "JPEGImages/x.jpg", "y": "JPEGImages/y.jpg"}, 2)
    write_label_next_csv(tmp_path / "label_next.csv", rows)
    with open(tmp_path / "label_next.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["rank", "id", "image", "reliability"]
    assert read_label_next_csv(tmp_path / "label_next.csv") == [
        {"rank": 1, "id": "y", "image": "JPEGImages/y.jpg", "reliability": 0.125},
        {"rank": 2, "id": "x", "image": "JPEGImages/x.jpg", "reliability": 0.25},
    ]


def test_closing_table_marks_a_stage_lower_than_the_one_before_and_names_final():
    table = results_table(run_results()).splitlines()
    assert next(line for line in table if line.startswith("ST++ stage-2")).endswith(
        "lower than the stage before (-1.00)"
    )
    assert not next(line for line in table if line.startswith("ST++ stage-1")).endswith(")")
    assert table[-1].startswith("final/ is the best-on-val model of the last stage, 4 ST++ stage-2 re-training (all)")
    assert "not swapped in" in table[-1]
