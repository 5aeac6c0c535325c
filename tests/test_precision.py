"""The native-precision check: answers from injected device descriptions, refuses before the run directory is
touched (one process and two), records the devices in results.json and the model card."""

import json
import os
import subprocess
import textwrap

import pytest
import torch
from helpers import REPO, launch_command
from test_results import pipeline_results

from stpp_hf.model_card import build_model_card
from stpp_hf.training import cli, precision
from stpp_hf.training.precision import (
    OVERRIDE_OPTION,
    DeviceFacts,
    PrecisionError,
    decide_precision,
    describe_device,
)
from stpp_hf.training.results import RunResults

AVX2_CPU = DeviceFacts(
    kind="cpu", name="AMD EPYC", machine="x86_64", cpu_capability="AVX2", cpu_flags=(),
    onednn_bf16=False, onednn_fp16=False,
)  # fmt: skip
AVX512_BF16_CPU = DeviceFacts(
    kind="cpu", name="AMD EPYC 9B14", machine="x86_64", cpu_capability="AVX512",
    cpu_flags=("avx512f", "avx512_bf16"), onednn_bf16=True, onednn_fp16=False,
)  # fmt: skip
AVX512_ONLY_CPU = DeviceFacts(
    kind="cpu", name="Intel Xeon Gold 6148", machine="x86_64", cpu_capability="AVX512", cpu_flags=("avx512f",),
    onednn_bf16=True, onednn_fp16=False,
)  # fmt: skip
V100 = DeviceFacts(
    kind="cuda", name="Tesla V100-SXM2-32GB", machine="x86_64", cpu_capability="AVX512", cpu_flags=("avx512f",),
    onednn_bf16=True, onednn_fp16=False, compute_capability=(7, 0), cuda_bf16=False,
)  # fmt: skip
A100 = DeviceFacts(
    kind="cuda", name="NVIDIA A100-SXM4-80GB", machine="x86_64", cpu_capability="AVX2", cpu_flags=(),
    onednn_bf16=False, onednn_fp16=False, compute_capability=(8, 0), cuda_bf16=True,
)  # fmt: skip
P100 = DeviceFacts(**{**A100.to_json(), "name": "Tesla P100", "compute_capability": (6, 0), "cuda_bf16": False})


def native(facts, mixed_precision):
    return decide_precision(mixed_precision, [facts]).native


def test_bf16_is_native_only_on_cpus_with_bf16_units_and_gpus_from_compute_capability_8():
    assert [native(facts, "bf16") for facts in (AVX2_CPU, AVX512_ONLY_CPU, AVX512_BF16_CPU, V100, A100)] == [
        False, False, True, False, True,
    ]  # fmt: skip
    assert [native(facts, "fp16") for facts in (AVX2_CPU, AVX512_BF16_CPU, P100, V100, A100)] == [
        False, False, False, True, True,
    ]  # fmt: skip
    assert all(native(facts, "no") for facts in (AVX2_CPU, AVX512_BF16_CPU, P100, V100, A100))


def test_a_refusal_names_the_device_what_it_lacks_the_cost_and_what_to_use_instead():
    with pytest.raises(PrecisionError) as refused:
        decide_precision("bf16", [AVX2_CPU]).check()
    message = str(refused.value)
    assert "--mixed_precision bf16" in message and "AMD EPYC" in message and "AVX2" in message
    assert "no bf16 kernels" in message and "350x slower" in message and "use --mixed_precision no" in message
    assert OVERRIDE_OPTION in message
    with pytest.raises(PrecisionError, match=r"Tesla V100.*compute capability 7\.0.*--mixed_precision fp16"):
        decide_precision("bf16", [V100]).check()
    with pytest.raises(PrecisionError, match="neither avx512_bf16 nor amx_bf16"):
        decide_precision("bf16", [AVX512_ONLY_CPU]).check()
    decide_precision("bf16", [AVX2_CPU], allow_emulated=True).check()  # the override lets it run
    decide_precision("bf16", [A100, A100]).check()


def test_every_process_must_pass_and_the_one_that_does_not_is_named():
    decision = decide_precision("bf16", [A100, A100, V100, A100])
    assert not decision.native and list(decision.problems) == [2]
    with pytest.raises(PrecisionError, match=r"process 2 \(CUDA Tesla V100") as refused:
        decision.check()
    assert "process 0" not in str(refused.value)
    record = decision.to_json()
    assert [device["processes"] for device in record["devices"]] == [[0, 1, 3], [2]]
    assert [device["native"]["bf16"] for device in record["devices"]] == [True, False]


def test_fp16_without_autocast_is_refused_even_with_the_override():
    # Accelerate's fp16 on a CPU runs no autocast: the run would be fp32 recorded as fp16
    with pytest.raises(PrecisionError, match="runs no fp16 autocast on cpu"):
        decide_precision("fp16", [AVX2_CPU], allow_emulated=True, autocasts=False).check()


def test_the_description_of_this_host_is_what_torch_reports():
    facts = describe_device("cpu")
    assert facts.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert facts.onednn_bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert DeviceFacts.from_json(json.loads(json.dumps(facts.to_json()))) == facts
    # on any CPU the verdict follows oneDNN: without its bf16 kernels bf16 is never native
    if not facts.onednn_bf16:
        assert not native(facts, "bf16")


def _inject(monkeypatch, facts):
    monkeypatch.setattr(precision, "describe_device", lambda device: facts)


def test_the_cli_refuses_before_the_run_directory_is_touched(tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, AVX2_CPU)
    run_dir = tmp_path / "run"
    argv = ["--output_dir", str(run_dir), "--mixed_precision", "bf16", "--report_to", "none"]
    with pytest.raises(PrecisionError, match="AVX2"):
        cli.main(argv)
    assert not run_dir.exists()
    # the dry run prints the verdict and the facts it rests on
    assert cli.main([*argv, "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "mixed precision bf16: NOT native, a launch is refused" in printed
    assert "CPU AMD EPYC (x86_64, AVX2; no avx512_bf16 / amx_bf16); oneDNN bf16 no" in printed
    assert not run_dir.exists()


def test_the_cli_goes_on_with_a_native_device_or_the_override(tmp_path, monkeypatch):
    class ReachedTheRunDirectory(Exception):
        pass

    def stop(*args, **kwargs):
        raise ReachedTheRunDirectory

    monkeypatch.setattr(cli, "open_run_directory", stop)
    argv = ["--output_dir", str(tmp_path / "run"), "--mixed_precision", "bf16", "--report_to", "none"]
    for facts, extra in ((AVX512_BF16_CPU, []), (AVX2_CPU, [OVERRIDE_OPTION])):
        _inject(monkeypatch, facts)
        with pytest.raises(ReachedTheRunDirectory):
            cli.main([*argv, *extra])


@pytest.mark.slow
def test_two_processes_both_refuse_when_one_device_lacks_bf16(tmp_path):
    # process 1 gets a CPU without bf16 kernels, process 0 one with them: both must stop, naming process 1
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.path.insert(0, {str(REPO / "tests")!r})
            from stpp_hf.training import cli, precision
            from test_precision import AVX2_CPU, AVX512_BF16_CPU
            facts = AVX2_CPU if os.environ["RANK"] == "1" else AVX512_BF16_CPU
            precision.describe_device = lambda device: facts
            try:
                cli.main(sys.argv[1:])
            except precision.PrecisionError as error:
                print(f"rank {{os.environ['RANK']}} refused: {{error}}")
                sys.exit(3)
            """
        )
    )
    command, env = launch_command(script, processes=2)
    run_dir = tmp_path / "run"
    completed = subprocess.run(
        [*command, "--output_dir", str(run_dir), "--mixed_precision", "bf16", "--report_to", "none"],
        env=dict(env, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} refused: --mixed_precision bf16 does not run natively here: process 1 (CPU AMD EPYC" in (
            completed.stdout
        ), completed.stdout[-2000:] + completed.stderr[-3000:]
    assert not run_dir.exists()


def test_results_json_and_the_model_card_record_the_devices_and_their_support():
    data = pipeline_results()
    del data["hub_dataset"]  # the card needs a full one; not what this test is about
    data["precision"] = decide_precision("bf16", [AVX512_BF16_CPU, AVX512_BF16_CPU]).to_json()
    results = RunResults.from_json(json.loads(json.dumps(data)))
    assert results.precision["devices"][0]["cpu_flags"] == ["avx512f", "avx512_bf16"]
    assert RunResults.from_json(results.to_json()) == results
    card = str(build_model_card(results, "owner/model"))
    assert (
        "| Precision and devices | bf16 mixed precision, native: processes 0, 1 on CPU AMD EPYC 9B14 "
        "(x86_64, AVX512; avx512_bf16) |" in card
    )
    older = {key: value for key, value in pipeline_results().items() if key != "hub_dataset"}  # no precision
    assert "| Precision and devices | unknown |" in str(build_model_card(RunResults.from_json(older), "owner/model"))
    broken = json.loads(json.dumps(data))
    del broken["precision"]["devices"][0]["native"]
    with pytest.raises(ValueError, match=r"precision.devices\[0\] lacks the field\(s\) \['native'\]"):
        RunResults.from_json(broken)


def test_this_hosts_dry_run_states_its_own_verdict(capsys, tmp_path):
    assert cli.main(["--output_dir", str(tmp_path / "run"), "--mixed_precision", "bf16", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    verdict = "native on every device" if native(describe_device("cpu"), "bf16") else "NOT native"
    assert f"mixed precision bf16: {verdict}" in printed and torch.backends.cpu.get_cpu_capability() in printed
