"""Honest failure: a diverged training stops with an error naming where, nothing non-finite is written (strict
JSON, no NaN weights), options that cannot be finite are refused, and artefacts get the umask's permissions."""

import json
import math
import os
import stat

import pytest
import torch
from helpers import run_script
from safetensors.torch import save_file

from stpp_hf.file_io import atomic_write_json, atomic_write_text, parse_json, replace_directory, sha256_json
from stpp_hf.training.config import resolve_run_config
from stpp_hf.training.divergence import NonFiniteError, check_finite_model
from stpp_hf.training.errors import ConfigError
from stpp_hf.training.options import parse_arguments


def test_options_that_cannot_be_finite_or_positive_are_refused_naming_the_option():
    for value in ("inf", "nan", "-inf"):
        with pytest.raises(ConfigError, match=f"--lr must be a finite number, got {value}"):
            resolve_run_config(*parse_arguments([f"--lr={value}"])[:3])
    with pytest.raises(ConfigError, match="--epochs must be >= 1, got -2"):
        resolve_run_config(*parse_arguments(["--epochs=-2"])[:3])
    with pytest.raises(ConfigError, match="--save_steps must be >= 0, got -1"):
        resolve_run_config(*parse_arguments(["--save_steps=-1"])[:3])


def test_json_is_written_and_read_strictly(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match=r"results.json holds a non-finite number at stages\[0\].history\[1\].loss"):
        atomic_write_json(path, {"stages": [{"history": [{"loss": 1.0}, {"loss": math.nan}]}]})
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing half-written is left
    with pytest.raises(ValueError, match="non-finite number at final.val_miou"):
        sha256_json({"final": {"val_miou": math.inf}})
    path.write_text('{"val_miou": NaN}')
    with pytest.raises(ValueError, match="results.json holds NaN, which strict JSON does not allow"):
        parse_json(path.read_text(), path)
    atomic_write_json(path, {"val_miou": 0.5})
    assert parse_json(path.read_text(), path) == {"val_miou": 0.5}


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "results.json", {"a": 1})
        atomic_write_text(tmp_path / "sub" / "ids.txt", "x\n")
        model_dir = tmp_path / ".model.tmp"
        save_file({"weight": torch.zeros(2)}, tmp_path / "weights.safetensors")  # safetensors writes 0600
        model_dir.mkdir()
        (tmp_path / "weights.safetensors").rename(model_dir / "model.safetensors")
        replace_directory(model_dir, tmp_path / "model")
    finally:
        os.umask(previous)
    for path in (tmp_path / "results.json", tmp_path / "sub" / "ids.txt", tmp_path / "model" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_model_with_a_non_finite_weight_is_named():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    check_finite_model(model, "the snapshot x")
    model[1].running_var[2] = math.inf
    with pytest.raises(
        NonFiniteError, match=r"the snapshot x holds non-finite weights in 1 of 7 tensors \(e.g. 1.running_var\)"
    ):
        check_finite_model(model, "the snapshot x")


@pytest.mark.slow
def test_a_diverged_run_stops_naming_stage_epoch_and_step_and_writes_nothing_non_finite(tmp_path):
    run_dir = tmp_path / "run"
    completed = run_script(run_dir, "--framework", "suponly", "--epochs", "2", "--lr", "1e6")
    assert completed.returncode == 1, completed.stdout[-2000:] + completed.stderr[-3000:]
    error = completed.stderr.strip().splitlines()[-1]
    assert error.startswith("stpp-train: error: [1-suponly] training diverged: "), error
    assert " at epoch 1, step " in error and "--lr" in error and "--mixed_precision no (fp32)" in error
    assert "Traceback" not in completed.stderr
    assert not (run_dir / "final").exists() and not (run_dir / "results.json").exists()
    stage = run_dir / "stages" / "1-suponly"
    assert not (stage / "best").exists() and not (stage / "checkpoint").exists()
    for path in run_dir.rglob("*.json"):  # whatever was written is strict JSON
        json.loads(path.read_text(), parse_constant=lambda constant: pytest.fail(f"{path} holds {constant}"))
