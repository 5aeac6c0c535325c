"""A saved model loads with trust_remote_code=True in a fresh process that cannot import stpp_hf."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import BLOCK_STPP_HF
from safetensors.torch import load_file, save_file

from stpp_hf import DeepLabImageProcessor, build_model

FRESH_PROCESS = BLOCK_STPP_HF + textwrap.dedent(
    """
    import json, sys

    block_stpp_hf()  # only the files saved with the model can be used
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    results, logits = {}, {}
    for name, directory in json.loads(sys.argv[1]).items():
        model = AutoModelForSemanticSegmentation.from_pretrained(directory, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(directory, trust_remote_code=True)
        pixel_values = load_file(directory + "/input.safetensors")["pixel_values"]
        with torch.no_grad():
            logits[name] = model(pixel_values).logits.contiguous()
        results[name] = {
            "model_class": type(model).__module__ + "." + type(model).__name__,
            "processor_class": type(processor).__name__,
            "tta_shape": list(model.predict_tta(pixel_values, scales=(1.0,)).shape),
        }
    save_file(logits, sys.argv[2])
    results["stpp_hf_imported"] = any(module.startswith("stpp_hf") for module in sys.modules)
    print(json.dumps(results))
    """
)


def load_in_fresh_process(directories: dict[str, str], tmp_path) -> tuple[dict, dict]:
    """Run FRESH_PROCESS on the saved `directories` (offline); returns its report per name and the logits."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(directories), str(tmp_path / "logits.safetensors")],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("stpp_hf_imported") is False
    return report, load_file(tmp_path / "logits.safetensors")


@pytest.mark.slow
def test_fresh_process_loads_saved_models_with_trust_remote_code(tmp_path):
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, 32, 40)
    directories, expected = {}, {}
    for name in ("deeplabv3plus", "deeplabv2"):
        model = build_model(name, backbone="resnet18", output_stride=16, preset="pascal_voc").eval()
        directory = tmp_path / name
        model.save_pretrained(directory)
        DeepLabImageProcessor().save_pretrained(directory)
        save_file({"pixel_values": pixel_values}, directory / "input.safetensors")
        with torch.no_grad():
            expected[name] = model(pixel_values).logits
        directories[name] = str(directory)
        assert "auto_map" in json.loads((directory / "config.json").read_text())

    report, logits = load_in_fresh_process(directories, tmp_path)
    for name, info in report.items():
        assert info["model_class"].startswith("transformers_modules.")  # the copied code, not stpp_hf
        assert info["processor_class"] == "DeepLabImageProcessor"
        assert info["tta_shape"] == [1, 21, 32, 40]
        torch.testing.assert_close(logits[name], expected[name], atol=1e-6, rtol=0)
