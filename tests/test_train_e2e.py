"""End-to-end runs of examples/train_stpp.py on tiny synthetic data (one and two processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_stpp.py"
TINY_ARGS = [
    "--synthetic_num_labeled", "8", "--synthetic_num_unlabeled", "12", "--synthetic_num_val", "6",
    "--synthetic_image_size", "32", "--epochs", "3", "--global_batch_size", "4", "--crop_size", "32",
    "--base_size", "32", "--inference_batch_size", "4", "--val_batch_size", "6", "--report_to", "none",
]


def script_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_script(output_dir, *extra, processes=1, timeout=300):
    """Run the example (``accelerate launch`` for several processes); returns the completed process."""
    if processes == 1:
        command = [sys.executable, str(SCRIPT)]
        env = script_env()
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
        ]
        env = dict(script_env(), ACCELERATE_USE_CPU="true")
    command += ["--output_dir", str(output_dir), *TINY_ARGS, *extra]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_ok(completed):
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]


# One training stage on two processes; afterwards both must hold the BatchNorm statistics of the main
# process, which is what it saves and what the per-epoch val must have scored.
BN_SYNC_SCRIPT = """
import sys
import torch
from accelerate import Accelerator
from stpp_hf import build_model
from stpp_hf.training.trainer import StageHyperParameters, train_stage

accelerator = Accelerator()
generator = torch.Generator().manual_seed(0)
pixels = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(8)]
train = [(image, (image[0] > 127).to(torch.uint8)) for image in pixels]
val = [(torch.randn(3, 32, 32, generator=generator), torch.randint(0, 2, (32, 32), generator=generator)) for _ in range(2)]
models = []

def factory():
    models.append(build_model("deeplabv3plus", num_labels=2, backbone="resnet18", output_stride=16))
    return models[-1]

hparams = StageHyperParameters(epochs=1, global_batch_size=4, base_lr=0.01, channels_last=False)
train_stage(factory, train, val, accelerator, sys.argv[1], hparams, 0, 2)
statistics = torch.cat([buffer.float().flatten() for buffer in models[0].buffers()])
gathered = accelerator.gather(statistics[None])
if accelerator.is_main_process and not torch.equal(gathered[0], gathered[1]):
    sys.exit("BatchNorm running statistics differ between the processes")
"""


@pytest.mark.slow
def test_two_processes_give_the_one_process_metric(tmp_path):
    # batch 1 at evaluation: each image's logits do not depend on which images share its batch
    completed = run_script(tmp_path / "run", "--framework", "st", "--val_batch_size", "1", processes=2)
    assert_ok(completed)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["hardware"] == "2x CPU"
    assert [stage["name"] for stage in results["stages"]] == ["suponly", "label_all", "retrain"]
    assert "ST (re-training)" in completed.stdout
    # the final metric of the 2-process run, recomputed by one process on the same weights
    from transformers import AutoModelForSemanticSegmentation

    import stpp_hf  # noqa: F401  (registers the models with the Auto classes)

    from stpp_hf.data import EvalDataset, EvalTransform, load_source
    from stpp_hf.training.trainer import evaluate

    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "run" / "final")
    root = tmp_path / "run" / "synthetic_data"
    val = EvalDataset(load_source("pascal", root, root / "splits" / "val.txt"), EvalTransform())
    one_process = evaluate(model, val, len(results["id2label"]), batch_size=1)
    assert one_process["miou"] == pytest.approx(results["final"]["val_miou"], abs=1e-12)
    # the per-epoch val of the 2 processes scored the weights that were saved (BN stats of the main process)
    assert results["stages"][-1]["val_miou"] == pytest.approx(results["final"]["val_miou"], abs=1e-12)
    # every image of the store was labeled exactly once across the two shards
    labeled = sorted((tmp_path / "run" / "pseudo_labels").glob("label_all-*/labels/*.png"))
    assert len(labeled) == results["num_unlabeled"]


@pytest.mark.slow
def test_two_processes_evaluate_the_main_process_batchnorm_statistics(tmp_path):
    script = tmp_path / "bn_sync.py"
    script.write_text(BN_SYNC_SCRIPT)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path / "stage"),
    ]
    completed = subprocess.run(command, env=dict(script_env(), ACCELERATE_USE_CPU="true"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_ok(completed)


@pytest.mark.slow
def test_stpp_run_writes_all_artefacts_and_the_table(tmp_path):
    run = tmp_path / "run"
    # a relative --output_dir, as in the README's first command (the script runs from the repository root)
    completed = run_script(os.path.relpath(run, REPO), "--framework", "stpp", "--teacher", "last")
    assert_ok(completed)
    results = json.loads((run / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == [
        "suponly", "select", "label_reliable", "retrain_reliable", "label_unreliable", "retrain_all"
    ]
    assert set(results["pseudo_label_miou"]) == {"reliable", "unreliable"}
    table_lines = (
        "SupOnly", "ST++ stage-1 re-training", "final (stpp)",
        "pseudo labels: reliable images (teacher 1-suponly/last, TTA)",
        "pseudo labels: unreliable images (teacher 4-retrain_reliable/last, TTA)",
    )
    for line in table_lines:
        assert line in completed.stdout
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "preprocessor_config.json").is_file()
    assert len(list((run / "stages" / "1-suponly" / "snapshots").iterdir())) == 3
    assert (run / "stages" / "1-suponly" / "val_predictions.png").is_file()
    reliable = (run / "stages" / "2-select" / "reliable_ids.txt").read_text().split("\n")
    assert reliable[0].startswith("JPEGImages/") and len([line for line in reliable if line]) == 6
    # the same-teacher check of the selection: recomputed from the id file used as a split
    assert "SupOnly teacher, no TTA: reliable images" in completed.stdout
    from transformers import AutoModelForSemanticSegmentation

    import stpp_hf  # noqa: F401  (registers the models with the Auto classes)
    from stpp_hf.data import EvalDataset, EvalTransform, load_source
    from stpp_hf.training.trainer import evaluate

    teacher = AutoModelForSemanticSegmentation.from_pretrained(run / "stages" / "1-suponly" / "last")
    reliable_set = EvalDataset(load_source("pascal", run / "synthetic_data", run / "stages" / "2-select" / "reliable_ids.txt"), EvalTransform())
    expected = evaluate(teacher, reliable_set, len(results["id2label"]), batch_size=6)["miou"]  # as --val_batch_size
    assert results["stages"][1]["teacher_miou"]["reliable"] == pytest.approx(expected, abs=1e-9)
    # relaunching a finished run redoes nothing and reproduces results.json
    again = run_script(run, "--framework", "stpp", "--teacher", "last")
    assert_ok(again)
    assert again.stdout.count("already finished") == 6
    assert json.loads((run / "results.json").read_text())["final"] == results["final"]
    # another setting in the same directory is refused with the differing field named
    refused = run_script(run, "--framework", "stpp", "--teacher", "best")
    assert refused.returncode != 0 and "teacher" in refused.stderr
