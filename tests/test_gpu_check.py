"""benchmarks/gpu_check.py in its tiny CPU mode, so the one command meant for a GPU machine keeps working: every
part a CPU can run (TF32 emulated, fp16 with the CPU GradScaler, DDP over gloo), part isolation, the JSON file."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
from tf32_emulation import emulated_tf32_convolutions, round_to_tf32  # noqa: E402


def test_tf32_rounding_keeps_10_mantissa_bits_and_the_emulation_reaches_every_conv():
    values = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 3 * 2**-12), 3.0e-39, 1e30])
    rounded = round_to_tf32(values)
    # 1 + 2^-11 is a tie: away from zero; below it, to nearest
    assert rounded[:5].tolist() == [1.0, 1 + 2**-10, 1 + 2**-10, 1.0, -(1 + 2**-10)]
    assert torch.equal(round_to_tf32(rounded), rounded)
    noise = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    relative = ((round_to_tf32(noise) - noise) / noise).abs().max().item()
    assert 2**-12 < relative <= 2**-11
    conv = torch.nn.Conv2d(3, 4, 3)
    image = torch.randn(1, 3, 8, 8, requires_grad=True)
    exact, original = conv(image), F.conv2d
    with emulated_tf32_convolutions():
        emulated = conv(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(image).dtype == torch.bfloat16  # autocast convs are left alone
    expected = F.conv2d(round_to_tf32(image.detach()), round_to_tf32(conv.weight.detach()), conv.bias)
    assert torch.equal(emulated.detach(), expected) and not torch.equal(emulated, exact)
    emulated.sum().backward()  # gradients pass the rounding
    setting = torch.backends.cudnn.conv
    saved, setting.fp32_precision = setting.fp32_precision, "ieee"
    try:
        with emulated_tf32_convolutions():  # full fp32 asked for (as the folding check's probes do): no rounding
            assert torch.equal(conv(image), exact)
    finally:
        setting.fp32_precision = saved
    assert image.grad is not None and F.conv2d is original  # restored on leaving


def test_full_check_on_cpu_needs_tiny():
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu"])


@pytest.mark.slow
def test_training_and_labeling_rows_of_every_precision_run_tiny(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--tiny", "--device", "cpu", "--json", str(out), "--parts", "training", "labeling"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # every figure is in the file
    training = report["parts"]["training"]
    assert training["ok"], training
    rows = training["result"]
    # true fp32, TF32 (emulated here), bf16, fp16 with the CPU GradScaler, each with channels_last off and on
    assert [(row["precision"], row["channels_last"]) for row in rows] == [
        (name, channels_last) for name in ("fp32", "tf32", "bf16", "fp16") for channels_last in (False, True)
    ]
    assert all(row["images_per_s"] > 0 and row["peak_memory_gib"] is None for row in rows)
    fp16 = [row for row in rows if row["precision"] == "fp16"]
    assert all(row["grad_scale"] > 1 for row in fp16)  # the scaler ran (its scale starts at 65536)
    fp32_loss, tf32_loss = (rows[index]["final_loss"] for index in (0, 2))
    assert fp32_loss != tf32_loss and fp32_loss == pytest.approx(tf32_loss, rel=1e-2)  # TF32 is a rounding
    labeling = report["parts"]["labeling"]
    assert labeling["ok"], labeling
    for dataset, variants in (("pascal", 4), ("cityscapes", 3)):
        rows = labeling["result"][dataset]["rows"]
        assert len(rows) == variants and all(row["images_per_s"] > 0 for row in rows.values())
        assert rows["batched fp32"]["labels_equal_to_batched_fp32_pct"] == 100.0
    # BN folding and batching change float rounding only
    assert labeling["result"]["pascal"]["rows"]["batch-1 fp32"]["labels_equal_to_batched_fp32_pct"] > 95.0


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "labeling", broken)
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--tiny", "--device", "cpu", "--json", str(out), "--parts", "labeling", "environment"])
    parts = json.loads(out.read_text())["parts"]
    assert parts["labeling"] == {
        "ok": False, "error": "RuntimeError: out of memory (simulated)", "seconds": parts["labeling"]["seconds"]
    }  # fmt: skip
    assert parts["environment"]["ok"] and parts == report["parts"]
    environment = parts["environment"]["result"]
    assert environment["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(environment["native_mixed_precision"]) == {"bf16", "fp16"}


@pytest.mark.slow
def test_ddp_part_runs_two_gloo_processes_with_equal_replicas(tmp_path):
    report = gpu_check.main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "c.json"), "--parts", "ddp"])
    ddp = report["parts"]["ddp"]
    assert ddp["ok"], ddp
    assert ddp["result"]["backend"] == "gloo" and ddp["result"]["weights_equal_across_ranks"]
    # without SyncBatchNorm (it needs a GPU) each rank keeps its own BatchNorm statistics
    assert not ddp["result"]["sync_batchnorm"] and not ddp["result"]["bn_statistics_equal_across_ranks"]


@pytest.mark.slow
@pytest.mark.parametrize("emulate_tf32", [False, True], ids=["fp32", "tf32-emulated"])
def test_tiny_check_runs_every_stpp_stage(tmp_path, emulate_tf32):
    # this CPU may lack bf16 units (then bf16 is refused without the override): the tiny run checks code paths,
    # not speed, so it passes --allow_emulated_precision on every CPU
    # labeling in plain fp32 is part of the training-and-labeling test above: here only under emulated TF32
    parts = ["labeling", "stpp"] if emulate_tf32 else ["stpp"]
    argv = ["--tiny", "--device", "cpu", "--json", str(tmp_path / "c.json"), "--output_dir", str(tmp_path)]
    argv += ["--parts", *parts, "--allow_emulated_precision", *(["--emulate_tf32"] * emulate_tf32)]
    report = gpu_check.main(argv)
    assert list(report["parts"]) == parts
    failed = {name: part for name, part in report["parts"].items() if not part["ok"]}
    # under emulated TF32 too: the BatchNorm-folding check of inference runs its probes in full fp32
    assert not failed, failed
    stpp = report["parts"]["stpp"]["result"]
    assert len(stpp["stages"]) == 6 and 0.0 <= stpp["final_val_miou"] <= 1.0
    assert stpp["mixed_precision"] == "bf16"
