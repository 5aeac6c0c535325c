"""examples/train_stpp.py options: command line, YAML / JSON files, clear errors for bad settings."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_stpp.py"


@pytest.fixture(scope="module")
def train_stpp():
    spec = importlib.util.spec_from_file_location("train_stpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_stpp"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["train_stpp"]


def test_options_from_yaml_json_and_command_line(train_stpp, tmp_path):
    (tmp_path / "run.yaml").write_text("framework: st\nepochs: 4\nbackbone: resnet34\ndataset: cityscapes\nteacher: last\n")
    data, model, run = train_stpp.parse_arguments([str(tmp_path / "run.yaml")])
    assert (run.framework, run.epochs, model.backbone, data.dataset, run.teacher) == ("st", 4, "resnet34", "cityscapes", "last")
    (tmp_path / "run.json").write_text(json.dumps({"framework": "suponly", "lr": 0.01, "split": "1_8/split_1"}))
    data, model, run = train_stpp.parse_arguments([str(tmp_path / "run.json")])
    assert (run.framework, run.lr, data.split) == ("suponly", 0.01, "1_8/split_1")
    data, model, run = train_stpp.parse_arguments(["--framework", "stpp", "--mixed_precision", "bf16", "--sync_bn"])
    assert (run.framework, run.mixed_precision, run.sync_bn, run.channels_last) == ("stpp", "bf16", True, None)
    with pytest.raises(SystemExit):
        train_stpp.parse_arguments(["--framework", "fixmatch"])
    (tmp_path / "bad.yaml").write_text("framework: stpp\nepochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        train_stpp.parse_arguments([str(tmp_path / "bad.yaml")])


def test_bad_settings_are_named(train_stpp, tmp_path):
    with pytest.raises(ValueError, match="hub_model_id"):
        train_stpp.main(["--push_to_hub", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--split or --labeled_id_path"):
        train_stpp.main(["--data_root", str(tmp_path), "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    assert train_stpp.DATASET_DEFAULTS["pascal"]["crop_size"] == 321
    assert train_stpp.DATASET_DEFAULTS["cityscapes"]["lr"] == 0.004
