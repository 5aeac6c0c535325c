"""The recipe is a global batch: the same steps, lr and batches for any number of processes, accumulation
steps or DataLoader workers."""

import json
import subprocess

import numpy as np
import pytest
import torch
from helpers import REPO, assert_ok, launch_command
from PIL import Image

from stpp_hf.data.fast_transforms import FastTrainTransform
from stpp_hf.training.sampling import training_loader


class StrongItems(torch.utils.data.Dataset):
    """Random PIL images and masks through the strong training transform (every random step of the spec)."""

    def __init__(self, count):
        rng = np.random.default_rng(0)
        self.samples = [
            (
                Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)),
                Image.fromarray(rng.integers(0, 3, (40, 52), dtype=np.uint8)),
            )
            for _ in range(count)
        ]
        self.transform = FastTrainTransform(base_size=48, crop_size=32, strong=True)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.transform(*self.samples[index])


def epoch_batches(num_workers, epoch_seed):
    loader = training_loader(StrongItems(11), global_batch_size=4, per_device_batch_size=2, num_workers=num_workers)
    loader.sampler.set_epoch(epoch_seed)
    return list(loader)


def test_batches_do_not_depend_on_the_number_of_workers():
    torch.manual_seed(1)
    no_workers = epoch_batches(0, 7)
    torch.manual_seed(2)  # another state of the main process's generator: it must not matter either
    two_workers = epoch_batches(2, 7)
    assert len(no_workers) == len(two_workers) == 4  # 11 items -> 2 global batches of 4 -> 4 batches of 2
    for (pixels, labels), (other_pixels, other_labels) in zip(no_workers, two_workers):
        assert torch.equal(pixels, other_pixels) and torch.equal(labels, other_labels)
    # and the randomness is really there: another epoch draws other images and augmentations
    other_epoch = epoch_batches(0, 8)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(no_workers, other_epoch))


# One training stage of a DeepLabV3+ without BatchNorm and dropout (they are the only parts of the
# forward pass that depend on which images share a process), recording the lr and the global-batch
# loss of every optimizer step (read back after every step: logging_steps=1).
STAGE_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from stpp_hf import build_model
from stpp_hf.training.config import resolve_options
from stpp_hf.training.trainer import train_stage

accumulation = int(sys.argv[2])
accelerator = Accelerator(gradient_accumulation_steps=accumulation)
records = []
accelerator.log = lambda values, step=None, **kwargs: records.append(values)
generator = torch.Generator().manual_seed(0)
pixels = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(12)]
train = [(image, (image[0] > 127).to(torch.uint8)) for image in pixels]
val = [(torch.randn(3, 32, 32, generator=generator), torch.randint(0, 2, (32, 32), generator=generator))]

def strip(module):
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.BatchNorm2d, torch.nn.Dropout, torch.nn.Dropout2d)):
            setattr(module, name, torch.nn.Identity())
        else:
            strip(child)

def factory():
    model = build_model("deeplabv3plus", num_labels=2, backbone="resnet18", output_stride=16)
    strip(model)
    return model

config = resolve_options(
    accelerator.num_processes, framework="suponly", epochs=1, global_batch_size=4, lr=0.01,
    val_batch_size=1, channels_last=False,
    gradient_accumulation_steps=accumulation,
)
summary = train_stage(factory, train, val, accelerator, sys.argv[1], config, 0, 2, logging_steps=1)
if accelerator.is_main_process:
    steps = [r for r in records if "train/lr" in r]
    print("RESULT" + json.dumps(
        {"steps": summary["steps"], "lr": [r["train/lr"] for r in steps], "loss": [r["train/loss"] for r in steps]}
    ))
accelerator.end_training()  # ends the process group: gloo's threads stop before the interpreter exits
"""


def run_stage(tmp_path, name, processes, accumulation):
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT)
    launch, env = launch_command(script, processes)
    command = [*launch, str(tmp_path / name), str(accumulation)]
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_ok(completed)
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


@pytest.mark.slow
def test_one_process_and_two_processes_with_the_same_global_batch_take_the_same_steps(tmp_path):
    one = run_stage(tmp_path, "one", processes=1, accumulation=1)
    two = run_stage(tmp_path, "two", processes=2, accumulation=1)
    accumulated = run_stage(tmp_path, "accumulated", processes=1, accumulation=2)
    # 12 images, global batch 4: 3 steps, lr 0.01 / 16 * 4 at the first step
    assert one["steps"] == two["steps"] == accumulated["steps"] == 3
    assert len(one["lr"]) == len(two["lr"]) == len(accumulated["lr"]) == 3
    assert one["lr"][0] == pytest.approx(0.01 / 16 * 4)
    assert two["lr"] == pytest.approx(one["lr"], rel=1e-12) and accumulated["lr"] == pytest.approx(
        one["lr"], rel=1e-12
    )
    # the same images with the same augmentations in the first global batch: the same loss
    assert two["loss"][0] == pytest.approx(one["loss"][0], abs=1e-6)
    assert accumulated["loss"][0] == pytest.approx(one["loss"][0], abs=1e-6)
    # later steps differ only by the order of the float sums of the gradients
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-3)
