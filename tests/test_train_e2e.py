"""End-to-end runs of examples/train_stpp.py on tiny synthetic data (one and two processes)."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import LONG_LABELING_STPP_ARGS, REPO, assert_ok, free_port, launch_command, run_script, script_command
from test_run_pictures import assert_finished_run_pictures

from stpp_hf.training.label_next import DEFAULT_LABEL_NEXT

STPP_STAGES = ["suponly", "select", "label_reliable", "retrain_reliable", "label_unreliable", "retrain_all"]


def run_two_machines(output_dirs, log_dir, *extra, timeout=300):
    """Launch the example as two one-process "machines" (machine ranks 0 and 1, ``output_dirs[rank]``
    each) and wait for both; returns their ``(returncode, stdout, stderr)``."""
    port = free_port()
    launches, logs = [], []
    for rank, output_dir in enumerate(output_dirs):
        command, env = script_command(
            output_dir, *extra, processes=2, machines=2, machine_rank=rank, main_process_port=port
        )
        # files, not pipes: a machine blocked on a full pipe would stall the other one in a collective
        logs.append((Path(log_dir) / f"machine{rank}.stdout", Path(log_dir) / f"machine{rank}.stderr"))
        with open(logs[-1][0], "w") as stdout, open(logs[-1][1], "w") as stderr:
            launches.append(
                subprocess.Popen(command, env=env, cwd=REPO, stdout=stdout, stderr=stderr, start_new_session=True)
            )
    deadline = time.monotonic() + timeout
    try:
        for launch in launches:
            launch.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for launch in launches:
            if launch.poll() is None:  # ends a machine left waiting, with the workers it started
                os.killpg(launch.pid, signal.SIGKILL)
                launch.wait()
    return [(launch.returncode, out.read_text(), err.read_text()) for launch, (out, err) in zip(launches, logs)]


def one_process_final_miou(run_dir) -> float:
    """Val mIoU of ``run_dir/final`` evaluated by this process alone (batch 1) on the run's synthetic val set."""
    from transformers import AutoModelForSemanticSegmentation

    import stpp_hf  # noqa: F401  (registers the models with the Auto classes)
    from stpp_hf.data import EvalDataset, EvalTransform, load_source
    from stpp_hf.training.evaluation import evaluate

    model = AutoModelForSemanticSegmentation.from_pretrained(Path(run_dir) / "final")
    root = Path(run_dir) / "synthetic_data"
    val = EvalDataset(load_source("pascal", root, root / "splits" / "val.txt"), EvalTransform())
    return evaluate(model, val, model.config.num_labels, batch_size=1)["miou"]


# One training stage on two processes; afterwards both must hold the BatchNorm statistics of the main
# process, which is what it saves and what the per-epoch val must have scored. Both processes then check
# overlapping split lists: the warning must be printed once, not once per process.
BN_SYNC_SCRIPT = """
import sys
import torch
from accelerate import Accelerator
from stpp_hf import build_model
from stpp_hf.data.splits import check_split_overlap
from stpp_hf.training.config import resolve_options
from stpp_hf.training.trainer import train_stage

accelerator = Accelerator()
generator = torch.Generator().manual_seed(0)
pixels = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(8)]
train = [(image, (image[0] > 127).to(torch.uint8)) for image in pixels]
val = [
    (torch.randn(3, 32, 32, generator=generator), torch.randint(0, 2, (32, 32), generator=generator)) for _ in range(2)
]
models = []

def factory():
    models.append(build_model("deeplabv3plus", num_labels=2, backbone="resnet18", output_stride=16))
    return models[-1]

config = resolve_options(
    accelerator.num_processes, framework="suponly", epochs=1, global_batch_size=4, lr=0.01,
    val_batch_size=1, channels_last=False
)
train_stage(factory, train, val, accelerator, sys.argv[1], config, 0, 2)
statistics = torch.cat([buffer.float().flatten() for buffer in models[0].buffers()])
gathered = accelerator.gather(statistics[None])
check_split_overlap(["a", "b"], ["b", "c"], ["d"])
accelerator.end_training()  # ends the process group: gloo's threads stop before the interpreter exits
if accelerator.is_main_process and not torch.equal(gathered[0], gathered[1]):
    sys.exit("BatchNorm running statistics differ between the processes")
"""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """``(run_dir, completed)``: a tiny ST++ run on two processes of one machine, batch 1 at evaluation (each
    image's logits then do not depend on which images share its batch, so one process can recompute the final
    metric). One run for the tests that check it and compare it with two machines."""
    run = tmp_path_factory.mktemp("two_processes") / "run"
    return run, run_script(run, "--framework", "stpp", "--val_batch_size", "1", processes=2)


@pytest.mark.slow
def test_two_processes_give_the_one_process_metric(two_process_run):
    run, completed = two_process_run
    assert_ok(completed)
    results = json.loads((run / "results.json").read_text())
    assert results["hardware"] == "2x CPU"
    assert [stage["name"] for stage in results["stages"]] == STPP_STAGES
    assert "ST++ stage-2 re-training (all)" in completed.stdout
    # the final metric of the 2-process run, recomputed by one process on the same weights
    assert one_process_final_miou(run) == pytest.approx(results["final"]["val_miou"], abs=1e-12)
    # the per-epoch val of the 2 processes scored the weights that were saved (BN stats of the main process)
    assert results["stages"][-1]["val_miou"] == pytest.approx(results["final"]["val_miou"], abs=1e-12)
    # every unlabeled image was labeled exactly once across the two shards (reliable or unreliable)
    labeled = [path.name for path in (run / "pseudo_labels").glob("label_*-*/labels/*.png")]
    assert len(labeled) == len(set(labeled)) == results["num_unlabeled"]


@pytest.mark.slow
def test_two_processes_evaluate_the_main_process_batchnorm_statistics(tmp_path):
    script = tmp_path / "bn_sync.py"
    script.write_text(BN_SYNC_SCRIPT)
    command, env = launch_command(script, processes=2)
    completed = subprocess.run(
        [*command, str(tmp_path / "stage")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert_ok(completed)
    assert completed.stderr.count("1 of 2 labeled images are also in the unlabeled set") == 1, completed.stderr[-3000:]


@pytest.mark.slow
def test_stpp_run_writes_all_artefacts_and_the_table(stpp_run):
    run, completed = stpp_run  # run with a relative --output_dir, as in the README's first command
    assert_ok(completed)
    results = json.loads((run / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == STPP_STAGES
    assert set(results["pseudo_label_miou"]) == {"reliable", "unreliable"}
    table_lines = (
        "SupOnly",
        "ST++ stage-1 re-training",
        "final (stpp)",
        "pseudo labels: reliable images (teacher 1-suponly/best, TTA)",
        "pseudo labels: unreliable images (teacher 4-retrain_reliable/best, TTA)",
    )
    for line in table_lines:
        assert line in completed.stdout
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "preprocessor_config.json").is_file()
    assert len(list((run / "stages" / "1-suponly" / "snapshots").iterdir())) == 3
    assert (run / "stages" / "1-suponly" / "val_predictions.png").is_file()
    reliable = (run / "stages" / "2-select" / "reliable_ids.txt").read_text().split("\n")
    assert reliable[0].startswith("JPEGImages/") and len([line for line in reliable if line]) == 8  # of 16
    assert results["stages"][1]["figure"] == "stages/2-select/selection.png"
    assert (run / "stages" / "2-select" / "selection.png").is_file()
    assert_finished_run_pictures(run, DEFAULT_LABEL_NEXT)  # the pictures, confusion matrices and label_next
    assert "final/ is the best-on-val model of the last stage, 6 ST++ stage-2 re-training (all)" in completed.stdout
    # pseudo labels carry the data's palette (the synthetic data's VOC colours), not grey
    store = next((run / "pseudo_labels").glob("label_reliable-*"))
    from PIL import Image

    pseudo = Image.open(next((store / "labels").glob("*.png")))
    assert pseudo.mode == "P" and pseudo.getpalette()[3:6] == [128, 0, 0]
    # the same-teacher check of the selection: recomputed from the id file used as a split
    assert "SupOnly teacher, no TTA: reliable images" in completed.stdout
    from transformers import AutoModelForSemanticSegmentation

    import stpp_hf  # noqa: F401  (registers the models with the Auto classes)
    from stpp_hf.data import EvalDataset, EvalTransform, load_source
    from stpp_hf.training.evaluation import evaluate

    teacher = AutoModelForSemanticSegmentation.from_pretrained(run / "stages" / "1-suponly" / "best")
    reliable_set = EvalDataset(
        load_source("pascal", run / "synthetic_data", run / "stages" / "2-select" / "reliable_ids.txt"),
        EvalTransform(),
    )
    expected = evaluate(teacher, reliable_set, len(results["id2label"]), batch_size=6)["miou"]  # as --val_batch_size
    assert results["stages"][1]["teacher_miou"]["reliable"] == pytest.approx(expected, abs=1e-9)
    # relaunching a finished run redoes nothing and reproduces results.json
    again = run_script(run, *LONG_LABELING_STPP_ARGS)
    assert_ok(again)
    assert again.stdout.count("already finished") == 6
    assert json.loads((run / "results.json").read_text())["final"] == results["final"]
    # another setting in the same directory is refused with the differing field named
    refused = run_script(run, *LONG_LABELING_STPP_ARGS, "--teacher", "last")
    assert refused.returncode != 0 and "teacher" in refused.stderr


@pytest.mark.slow
def test_two_machines_give_the_single_machine_two_process_run(tmp_path, two_process_run):
    # the same 2 processes (same ranks, same global batch) once as two one-process "machines" sharing the
    # run directory, once on one machine (the fixture's run, with the same options)
    machines = run_two_machines([tmp_path / "nodes"] * 2, tmp_path, "--framework", "stpp", "--val_batch_size", "1")
    for returncode, stdout, stderr in machines:
        assert returncode == 0, stdout[-3000:] + stderr[-5000:]
    single, completed = two_process_run
    assert_ok(completed)
    nodes = tmp_path / "nodes"
    assert not list(nodes.glob(".shared-dir-check-*"))  # the launch's markers are gone
    select = Path("stages", "2-select")
    for name in ("reliable_ids.txt", "unreliable_ids.txt", "reliability.json"):
        assert (nodes / select / name).read_bytes() == (single / select / name).read_bytes(), name
    # each store is named after its teacher's weights: the same teachers, and from them the same labels,
    # written by both machines (one journal per writing process)
    stores = sorted(path.name for path in (single / "pseudo_labels").iterdir())
    assert sorted(path.name for path in (nodes / "pseudo_labels").iterdir()) == stores and len(stores) == 2
    for store in stores:
        labels = sorted(path.name for path in (single / "pseudo_labels" / store / "labels").iterdir())
        assert sorted(path.name for path in (nodes / "pseudo_labels" / store / "labels").iterdir()) == labels
        for label in (Path("pseudo_labels", store, "labels", name) for name in labels):
            assert (nodes / label).read_bytes() == (single / label).read_bytes(), label
        assert len(list((nodes / "pseudo_labels" / store).glob("journal-*.jsonl"))) == 2
    final = Path("final", "model.safetensors")
    assert (nodes / final).read_bytes() == (single / final).read_bytes()
    results = {run: json.loads((run / "results.json").read_text()) for run in (nodes, single)}
    for run in results.values():
        del run["wall_time_s"]
        # the run directories differ; the data in them is the same, by content
        del run["config"]["output_dir"]
    assert results[nodes] == results[single]
    assert one_process_final_miou(nodes) == pytest.approx(results[nodes]["final"]["val_miou"], abs=1e-12)


@pytest.mark.slow
def test_machines_without_a_shared_run_directory_are_refused_before_writing(tmp_path):
    node0, node1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    node0.mkdir(parents=True)  # one existing (with a marker left by an earlier launch), one to be created
    stale = node0 / ".shared-dir-check-00000000000000000000000000000000-1"
    stale.write_text("{}")
    machines = run_two_machines([node0, node1], tmp_path, "--framework", "stpp")
    for returncode, stdout, stderr in machines:
        assert returncode != 0
        errors = [line for line in stderr.splitlines() if "RunDirNotSharedError:" in line]
        assert len(errors) == 1, stderr[-5000:]
        assert "must be on a filesystem that all nodes share" in errors[0]
        assert f"process 0 (host {socket.gethostname()}, run directory {node0})" in errors[0]
        assert f"did not see the marker of process 1 (host {socket.gethostname()}, run directory {node1})" in errors[0]
    # nothing half-written: no synthetic data, dataset cache, stage directory or state.json, no marker
    assert [path.name for path in node0.iterdir()] == [stale.name]
    assert not node1.exists()
