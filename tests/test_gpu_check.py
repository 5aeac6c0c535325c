"""benchmarks/gpu_check.py in its tiny CPU mode, so the GPU session's one command does not rot."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_training_and_labeling_parts_run_tiny():
    settings = gpu_check.recipe(tiny=True)
    rows = gpu_check.training_steps(settings, torch.device("cpu"))
    # fp16 autocast + gradient scaler is CUDA-only; fp32 and bf16, each with channels_last off and on
    assert [(row["precision"], row["channels_last"]) for row in rows] == [
        ("fp32", False),
        ("fp32", True),
        ("bf16", False),
        ("bf16", True),
    ]
    assert all(row["images_per_s"] > 0 and row["peak_memory_gib"] is None for row in rows)
    labeling = gpu_check.labeling(settings, torch.device("cpu"))
    assert labeling["batched_images_per_s"] > 0 and labeling["batch-1_images_per_s"] > 0
    assert labeling["labels_equal_pixels_pct"] > 95.0  # BN folding and batching change float rounding only


def test_full_check_on_cpu_needs_tiny():
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])


@pytest.mark.slow
def test_tiny_check_runs_every_stpp_stage_in_bf16(tmp_path):
    report = gpu_check.main(["--tiny", "--device", "cpu", "--output_dir", str(tmp_path)])
    names = [name for name, _ in report["stpp_bf16"]["stages"]]
    assert len(names) == 6 and "final_val_miou" in report["stpp_bf16"]
    assert 0.0 <= report["stpp_bf16"]["final_val_miou"] <= 1.0
