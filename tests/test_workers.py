"""The number of DataLoader workers changes nothing: training (1 and 2 processes, fresh and resumed with another
worker count), evaluation, selection and labeling give the same numbers with 0 and 2 workers."""

import json
import os
import subprocess

import pytest
import torch
from helpers import (
    NUM_CLASSES,
    REPO,
    FakeShardAccelerator,
    assert_ok,
    images_of_mixed_sizes,
    launch_command,
    tiny_model,
)

from stpp_hf.data import PseudoLabelStore
from stpp_hf.training.config import default_num_workers, resolve_run_config
from stpp_hf.training.evaluation import evaluate
from stpp_hf.training.options import parse_arguments
from stpp_hf.training.pseudo_labeling import label_images, pseudo_label_miou
from stpp_hf.training.selection import compute_reliability

# Two epochs of a whole DeepLabV3+ (BatchNorm and dropout kept: dropout draws from the process's generator, which
# the loader must leave as it would with no workers), the loss of every step and a digest of the last weights.
# argv: stage dir, workers, and optionally a directory that gets a copy of the stage dir as it stands once every
# process has saved epoch 1's checkpoint: what killing every process right there would leave, to resume from, so
# one fresh run serves as both the uninterrupted and the cut-off run.
STAGE_SCRIPT = """
import hashlib, json, os, shutil, sys
import torch
from accelerate import Accelerator
from stpp_hf import build_model
from stpp_hf.training import trainer
from stpp_hf.training.config import resolve_options
from stpp_hf.training.trainer import train_stage

stage_dir, workers = sys.argv[1], int(sys.argv[2])
cut_off_copy = sys.argv[3] if len(sys.argv) > 3 else None
accelerator = Accelerator()
records = []
accelerator.log = lambda values, step=None, **kwargs: records.append((step, values))
save_checkpoint = trainer._save_checkpoint

def save_then_maybe_copy(accelerator, checkpoint_dir, state):
    save_checkpoint(accelerator, checkpoint_dir, state)  # ends with every process past its writes
    if state.epoch == 1 and cut_off_copy is not None:
        if accelerator.is_main_process:
            shutil.copytree(stage_dir, cut_off_copy)
        accelerator.wait_for_everyone()  # nothing is written into the stage dir while it is copied

trainer._save_checkpoint = save_then_maybe_copy
generator = torch.Generator().manual_seed(0)
pixels = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(16)]
train = [(image, (image[0] > 127).to(torch.uint8)) for image in pixels]
val = [(torch.randn(3, 32, 32, generator=generator), torch.randint(0, 2, (32, 32), generator=generator))]

def factory():
    return build_model("deeplabv3plus", num_labels=2, backbone="resnet18", output_stride=16)

config = resolve_options(
    accelerator.num_processes, framework="suponly", epochs=2, global_batch_size=4, lr=0.01,
    val_batch_size=1, num_workers=workers,
    channels_last=False,
)
summary = train_stage(factory, train, val, accelerator, stage_dir, config, 0, 2, keep_last=True, logging_steps=1)
if accelerator.is_main_process:
    from safetensors.torch import load_file
    weights = load_file(os.path.join(stage_dir, "last", "model.safetensors"))
    digest = hashlib.sha256(b"".join(weights[name].numpy().tobytes() for name in sorted(weights))).hexdigest()
    steps = {step: values["train/loss"] for step, values in records if "train/loss" in values}
    print("RESULT" + json.dumps({"history": summary["history"], "steps": steps, "weights": digest}))
accelerator.end_training()
"""


def run_stage(tmp_path, name, processes, workers, cut_off_copy=None):
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT)
    launch, env = launch_command(script, processes)
    command = [
        *launch,
        str(tmp_path / name),
        str(workers),
        *([] if cut_off_copy is None else [str(tmp_path / cut_off_copy)]),
    ]
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_ok(completed)
    if cut_off_copy is not None:  # cut off after epoch 1: a checkpoint and no finished stage
        progress = json.loads((tmp_path / cut_off_copy / "checkpoint" / "trainer_state.json").read_text())
        assert progress["epoch"] == 1 and not (tmp_path / cut_off_copy / "last").exists()
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_training_is_the_same_with_and_without_workers_fresh_and_resumed(tmp_path, processes):
    no_workers = run_stage(tmp_path, "no_workers", processes, workers=0, cut_off_copy="resumed_with_workers")
    two_workers = run_stage(tmp_path, "two_workers", processes, workers=2, cut_off_copy="resumed")
    assert len(no_workers["steps"]) == 8  # 16 images, global batch 4, 2 epochs
    assert two_workers == no_workers  # every step's loss and the last weights, bit for bit
    # cut off after epoch 1 with 2 workers, resumed with none: the uninterrupted run's epoch 2 and weights
    resumed = run_stage(tmp_path, "resumed", processes, workers=0)
    assert resumed["history"] == no_workers["history"]
    assert resumed["steps"] == {step: no_workers["steps"][step] for step in ("5", "6", "7", "8")}
    assert resumed["weights"] == no_workers["weights"]
    # and the other way round: cut off with none, resumed with 2 workers
    assert run_stage(tmp_path, "resumed_with_workers", processes, workers=2)["weights"] == no_workers["weights"]


class WorkerItems(torch.utils.data.Dataset):
    """``items`` that may only be read inside a DataLoader worker (``in_workers``) or only outside one."""

    def __init__(self, items, in_workers):
        self.items, self.in_workers = items, in_workers

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        assert (torch.utils.data.get_worker_info() is not None) == self.in_workers
        return self.items[index]


def with_and_without_workers(compute):
    """``compute(dataset, num_workers)`` with 0 workers (read in this process) and with 2 (read in workers)."""
    items = images_of_mixed_sizes(3)
    return compute(WorkerItems(items, False), 0), compute(WorkerItems(items, True), 2)


class OneShard(FakeShardAccelerator):
    """Process ``process_index`` of ``num_processes`` whose reductions see its own shard only."""

    def reduce(self, tensor, reduction):
        return tensor


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_evaluation_is_the_same_with_and_without_workers(rank, world):
    model = tiny_model(2)

    def compute(dataset, workers):
        return evaluate(model, dataset, NUM_CLASSES, None, OneShard(rank, world), batch_size=2, num_workers=workers)

    no_workers, two_workers = with_and_without_workers(compute)
    assert no_workers == two_workers and 0 < no_workers["miou"] < 1


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_selection_is_the_same_with_and_without_workers(rank, world):
    snapshots = [tiny_model(0, perturbation_seed=seed) for seed in (1, 2)] + [tiny_model(0)]
    ids = [f"img_{index}" for index in range(6)]

    def compute(dataset, workers):
        accelerator = FakeShardAccelerator(rank, world)
        return compute_reliability(
            snapshots, dataset, ids, NUM_CLASSES, accelerator, batch_size=3, num_workers=workers
        )

    no_workers, two_workers = with_and_without_workers(compute)
    assert no_workers == two_workers and len(no_workers) == len(range(rank, 6, world))


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_labeling_is_the_same_with_and_without_workers(tmp_path, rank, world):
    model = tiny_model(3)
    ids = [f"img_{index}" for index in range(6)]

    def compute(dataset, workers):
        store = PseudoLabelStore(tmp_path / f"store_{workers}")
        accelerator = FakeShardAccelerator(rank, world)
        written = label_images(model, dataset, ids, store, accelerator, batch_size=2, num_workers=workers)
        mine = ids[rank::world]
        return (
            written,
            {image_id: store.get(image_id).tobytes() for image_id in mine},
            (pseudo_label_miou(store, dataset, mine, NUM_CLASSES, num_workers=workers) if world == 1 else None),
        )

    no_workers, two_workers = with_and_without_workers(compute)
    assert no_workers == two_workers and no_workers[0] == len(ids[rank::world])


def test_workers_default_to_the_cores_per_process_on_cuda_and_to_none_on_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers("cpu", 1) == 0
    assert default_num_workers("cuda", 1) == 8  # at most 8
    assert default_num_workers("cuda", 4) == 4  # 16 cores over 4 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 8 processes, 2 on this node
    assert default_num_workers("cuda", 8) == 8
    arguments = parse_arguments([])[:3]
    assert resolve_run_config(*arguments, 1, "cuda").data.num_workers == 8
    assert resolve_run_config(*arguments, 1, "cpu").data.num_workers == 0
    assert resolve_run_config(*parse_arguments(["--num_workers", "3"])[:3], 1, "cuda").data.num_workers == 3
