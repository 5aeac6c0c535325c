"""results.json as RunResults: what the pipeline writes reads back field for field; bad files name the field."""

import copy
import json

import pytest

from stpp_hf.training.results import RunResults, results_table


def pipeline_results() -> dict:
    """An ST++ results.json with every field the pipeline and stpp-train write (ARCHITECTURE.md), in file order."""
    train = {"kind": "train", "val_miou": 0.5, "per_class_iou": {"background": 0.9, "disc": None}, "best_epoch": 2,
             "model_dir": "", "history": [{"epoch": 1, "loss": 1.2, "val_miou": 0.4}]}  # fmt: skip
    stages = [
        {"name": "suponly", **train, "model_dir": "stages/1-suponly/best"},
        {"name": "select", "kind": "select", "num_reliable": 3, "num_unreliable": 3,
         "teacher_miou": {"reliable": 0.6, "unreliable": 0.4}, "figure": "stages/2-select/selection.png"},
        {"name": "label_reliable", "kind": "label", "subset": "reliable", "num_images": 3, "pseudo_label_miou": 0.61,
         "teacher": "stages/1-suponly/best", "store_dir": "pseudo_labels/label_reliable-ab"},
        {"name": "retrain_reliable", **train, "model_dir": "stages/4-retrain_reliable/best"},
        {"name": "label_unreliable", "kind": "label", "subset": "unreliable", "num_images": 3,
         "pseudo_label_miou": None, "teacher": "stages/4-retrain_reliable/best",
         "store_dir": "pseudo_labels/label_unreliable-cd"},
        {"name": "retrain_all", **train, "model_dir": "stages/6-retrain_all/best"},
    ]  # fmt: skip
    return {
        "framework": "stpp", "dataset": "hub-owner/scenes", "split": "train: 3 labeled, seed 0",
        "model": "deeplabv3plus", "backbone": "resnet18", "output_stride": 16, "epochs": 3, "global_batch_size": 4,
        "lr": 0.02, "crop_size": 32, "pretrained_backbone": False,
        "backbone_weights": {"spec": "none", "kind": "none", "hub_id": None, "path": None},
        "hub_dataset": {"dataset_name": "hub-owner/scenes", "partition": {"num_labeled": 3}},
        "notes": "extra metadata is kept",
        "num_labeled": 3, "num_unlabeled": 6, "hardware": "1x CPU", "wall_time_s": 12.3,
        "id2label": {"0": "background", "1": "disc"},
        "stages": stages,
        "final": {"val_miou": 0.52, "per_class_iou": {"background": 0.93, "disc": None}, "model_dir": "final"},
        "pseudo_label_miou": {"reliable": 0.61, "unreliable": None},
        "config": {"global_batch_size": 4, "data": {"val": {"num_images": 2}}},
    }  # fmt: skip


PRECISION = {"mixed_precision": "bf16", "native": False, "allow_emulated": True,
             "devices": [{"processes": [0, 1], "kind": "cpu", "name": "AMD EPYC", "native": {"bf16": False},
                          "cpu_capability": "AVX2"}]}  # fmt: skip


def test_results_read_back_field_for_field_and_in_file_order():
    data = {}  # precision after hub_dataset, where the pipeline writes it
    for key, value in pipeline_results().items():
        data.update({key: value, "precision": PRECISION} if key == "hub_dataset" else {key: value})
    results = RunResults.from_json(copy.deepcopy(data))
    assert json.dumps(results.to_json()) == json.dumps(data)  # same fields, values and order
    assert results.precision == PRECISION  # kept as the JSON object it is, device facts included
    assert results.stages[1].teacher_miou == {"reliable": 0.6, "unreliable": 0.4}
    assert results.final.model_dir == "final" and results.extra == {"notes": "extra metadata is kept"}
    assert [index for index, _ in results.training_stages()] == [0, 3, 5]
    assert RunResults.from_json(results.to_json()) == results


def test_an_earlier_versions_batch_size_is_read_as_the_global_batch_size():
    data = {("batch_size" if key == "global_batch_size" else key): value for key, value in pipeline_results().items()}
    results = RunResults.from_json(data)
    assert results.global_batch_size == 4 and "batch_size" not in results.extra
    assert list(results.to_json()) == list(pipeline_results())  # written back under the new name, in its place


def test_a_minimal_hand_written_results_file_reads_back():
    # what a reader needs of each kind of stage, and nothing else (as the Hub tests write it)
    data = {key: pipeline_results()[key] for key in RunResults.required_fields({})}
    data["stages"] = [
        {"name": "suponly", "kind": "train", "val_miou": 0.4, "per_class_iou": {}, "model_dir": "m"},
        {"name": "select", "kind": "select", "num_reliable": 1, "num_unreliable": 2},
        {"name": "label_all", "kind": "label", "num_images": 3},
    ]
    results = RunResults.from_json(data)
    assert results.stages[2].store_dir is None and results.stages[0].history is None
    assert RunResults.from_json(results.to_json()) == results


def test_a_run_without_metadata_leaves_the_description_out():
    data = {key: value for key, value in pipeline_results().items() if key not in ("dataset", "split", "notes")}
    results = RunResults.from_json(data)
    assert results.dataset is None and "dataset" not in results.to_json()
    with pytest.raises(ValueError, match=r"results.json lacks the field\(s\) \['dataset', 'split'\]"):
        results.require("dataset", "split", "model")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data.pop("final"), r"results.json: results lacks the field\(s\) \['final'\]"),
        (lambda data: data["final"].pop("val_miou"), r"results.json: final lacks the field\(s\) \['val_miou'\]"),
        (lambda data: data["stages"][3].update(val_miou="0.5"), r"field stages\[3\].val_miou must be a number"),
        (lambda data: data["stages"][2].update(num_images=True), r"field stages\[2\].num_images must be an integer"),
        (lambda data: data["stages"][1].update(kind="selection"), r"field stages\[1\].kind must be one of"),
        (lambda data: data["stages"][0].update(val_mIoU=0.5), r"stages\[0\] has the unknown field 'val_mIoU'"),
        (lambda data: data.update(num_labeled="3"), r"field results.num_labeled must be an integer"),
        (lambda data: data.update(backbone_weights="tv_in1k"), "backbone_weights must be the dict of describe_"),
        (
            lambda data: data.update(precision={**PRECISION, "devices": [{"processes": [0], "kind": "cpu"}]}),
            r"precision.devices\[0\] lacks the field\(s\) \['name', 'native'\]",
        ),
        (lambda data: data.update(precision={**PRECISION, "native": "yes"}), r"field precision.native must be true"),
        (lambda data: data.update(precision={**PRECISION, "verdict": 1}), "precision has the unknown field 'verdict'"),
    ],
)
def test_a_bad_results_file_is_refused_naming_the_file_and_the_field(tmp_path, damage, message):
    data = pipeline_results()
    damage(data)
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as error:
        RunResults.read(tmp_path)
    assert str(tmp_path / "results.json") in str(error.value)


def test_reading_a_run_directory_without_results_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json not found: is .* a finished run directory"):
        RunResults.read(tmp_path)
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        RunResults.read(tmp_path)


def test_results_table_rows():
    table = results_table(RunResults.from_json(pipeline_results())).splitlines()
    rows = {line[: line.rindex("  ")].strip(): line.rsplit(None, 1)[-1] for line in table[2:-1]}
    assert rows == {
        "SupOnly": "50.00",
        "ST++ stage-1 re-training (reliable)": "50.00",
        "ST++ stage-2 re-training (all)": "50.00",
        "final (stpp)": "52.00",
        "pseudo labels: reliable images (teacher 1-suponly/best, TTA)": "61.00",  # the unreliable subset has no mIoU
        "SupOnly teacher, no TTA: reliable images": "60.00",
        "SupOnly teacher, no TTA: unreliable images": "40.00",
    }
    assert table[-1] == "final/ is the best-on-val model of the last stage, 6 ST++ stage-2 re-training (all)."
