"""Helpers shared by several test modules (plain functions; the shared fixtures are in conftest.py).

Launching the example or a script in fresh processes, the tiny models and images the labeling and selection
tests compare against their references, and the import blocker of the remote-code checks.
"""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stpp_hf import build_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_stpp.py"
INFER_PATH = REPO / "examples" / "infer.py"
TINY_ARGS = [
    "--synthetic_num_labeled",
    "8",
    "--synthetic_num_unlabeled",
    "12",
    "--synthetic_num_val",
    "6",
    "--synthetic_image_size",
    "32",
    "--epochs",
    "3",
    "--global_batch_size",
    "4",
    "--crop_size",
    "32",
    "--base_size",
    "32",
    "--inference_batch_size",
    "4",
    "--val_batch_size",
    "6",
    "--report_to",
    "none",
]
# ST++ with more unlabeled images than TINY_ARGS, labeled one at a time, so that its labeling stages last long
# enough to be hit by a kill; the run of conftest's ``stpp_run`` fixture
LONG_LABELING_STPP_ARGS = ["--framework", "stpp", "--synthetic_num_unlabeled", "16", "--inference_batch_size", "1"]

# Prepended to a script run in a fresh process: ``block_stpp_hf()`` makes any import of the package fail,
# so only the code files saved with a model (its remote code) can be used.
BLOCK_STPP_HF = textwrap.dedent(
    """
    import sys

    class BlockStppHf:
        def find_spec(self, name, path=None, target=None):
            if name == "stpp_hf" or name.startswith("stpp_hf."):
                raise ImportError("stpp_hf is blocked in this process")

    def block_stpp_hf():
        sys.meta_path.insert(0, BlockStppHf())
    """
)


# ---- processes --------------------------------------------------------------------------------------------


def script_env():
    """The environment of a launched script: one OpenMP thread per process, no inherited CPU switch."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def launch_command(script, processes=1, machines=1, machine_rank=0, main_process_port=None):
    """``(command, env)`` that runs the Python file ``script``: plain Python for one process, otherwise
    ``accelerate launch`` of CPU processes (gloo), ``processes`` in all over ``machines`` "machines" (one
    launch per machine, all on this host, meeting at 127.0.0.1:``main_process_port``)."""
    if processes == 1:
        return [sys.executable, str(script)], script_env()
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        str(machines),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if machines > 1:
        command += [
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(main_process_port),
        ]
    return [*command, str(script)], dict(script_env(), ACCELERATE_USE_CPU="true")


def script_command(output_dir, *extra, processes=1, machines=1, machine_rank=0, main_process_port=None):
    """``(command, env)`` that runs the example on tiny data (see :func:`launch_command`)."""
    command, env = launch_command(SCRIPT, processes, machines, machine_rank, main_process_port)
    return [*command, "--output_dir", str(output_dir), *TINY_ARGS, *extra], env


def run_script(output_dir, *extra, processes=1, timeout=300):
    """Run the example (``accelerate launch`` for several processes); returns the completed process."""
    command, env = script_command(output_dir, *extra, processes=processes)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_ok(completed):
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]


# ---- tiny models and data ---------------------------------------------------------------------------------

NUM_CLASSES = 3  # of tiny_model and images_of_mixed_sizes


def tiny_deeplab(**kwargs):
    """The small DeepLabV3+ of the tests (ResNet-18, output stride 16); ``kwargs`` go to ``build_model``."""
    return build_model("deeplabv3plus", backbone="resnet18", output_stride=16, **kwargs)


def tiny_model(seed=0, perturbation_seed=None):
    """An untrained DeepLabV3+-ResNet-18 whose argmax varies over an image; ``perturbation_seed``
    adds classifier noise, like snapshots of one run that partly agree."""
    torch.manual_seed(seed)
    model = tiny_deeplab(num_labels=NUM_CLASSES)
    # random BN statistics so the untrained model gives varied, non-constant predictions
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
        elif isinstance(module, torch.nn.Conv2d) and module.out_channels == NUM_CLASSES:
            torch.nn.init.normal_(module.weight, std=1.0)  # the classifier: spread the class scores
    if perturbation_seed is not None:
        torch.manual_seed(perturbation_seed)
        with torch.no_grad():
            model.classifier.weight.add_(0.5 * torch.randn_like(model.classifier.weight))
    model.eval()
    with torch.no_grad():  # centre each class score so the argmax varies over the image
        probe = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(seed))
        model.classifier.bias -= model(pixel_values=probe).logits.mean(dim=(0, 2, 3))
    return model


def images_of_mixed_sizes(seed=0):
    """Six ``(image float [3, H, W], mask int64 [H, W])`` pairs of two sizes (32x40 and 28x44)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(32, 40), (32, 40), (32, 40), (28, 44), (32, 40), (28, 44)]
    items = []
    for height, width in sizes:
        image = torch.randn(3, height, width, generator=generator)
        mask = torch.randint(0, NUM_CLASSES, (height, width), generator=generator)
        items.append((image, mask))
    return items


class FakeShardAccelerator:
    """What the labeling and selection code reads of an ``Accelerator``: one process ``process_index`` of
    ``num_processes`` on the CPU, with CPU autocast to ``dtype`` (None: fp32)."""

    def __init__(self, process_index, num_processes, dtype=None):
        self.process_index, self.num_processes, self.device = process_index, num_processes, torch.device("cpu")
        self.dtype = dtype

    def autocast(self):  # what Accelerator(mixed_precision=...).autocast() does on CPU
        return torch.autocast("cpu", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()


def trained_looking_batchnorm(model, seed=0, generator=None):
    """Running statistics and affine parameters spread as in a trained network (a random init has mean 0, var 1),
    drawn from ``generator`` (else one seeded with ``seed``); ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(seed) if generator is None else generator
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(0.5 * torch.randn(size, generator=generator))
            module.running_var.copy_(torch.randn(size, generator=generator).exp())
            module.weight.data.copy_(0.1 + 1.5 * torch.rand(size, generator=generator))
            module.bias.data.copy_(0.3 * torch.randn(size, generator=generator))
    return model.eval()


def wait_for(process, condition, timeout: float, point: str = "the signal point") -> None:
    """Poll ``condition()`` until it holds; fails if ``process`` (a launched run, stdout piped) ends first or
    ``timeout`` seconds pass (then the run is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {point}:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"{point} not reached in time")
