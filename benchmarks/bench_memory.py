#!/usr/bin/env python
"""Memory per device of every phase of each recipe in examples/recipes/, for 1, 2, 4 and 8 GPUs, counted on CPU.

How it is counted: each phase runs on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
strides, no data and no arithmetic, so a full-size step takes seconds on a CPU) under a dispatch mode that
follows every tensor storage an operator creates until its last reference is gone: the bytes an allocator has
to hold at each moment, gradients, momentum and every transient included. A phase's figure is the peak of those
bytes plus what was already resident when it began (the weights, BatchNorm buffers and, while training, the
momentum buffers). It is the same count on any device; a CUDA caching allocator adds its fragmentation on top,
and operators' private workspaces (cuDNN's) are not tensors and are not counted.

Check: at a small size the same counter runs on real CPU tensors, with oneDNN off so that every byte the CPU
allocator hands out is a tensor's, and is compared with the allocator's own peak (torch.profiler
``profile_memory``: its running total of allocated bytes), and the fake-tensor count with the real-tensor
count; both must agree within 5 %.

Phases (the per-device batch is the global batch 16 / GPUs; the same BatchNorm batch as the recipe):

* ``train fp32``, ``train bf16`` (autocast), ``train ckpt`` / ``train ckpt bf16`` (``--activation_checkpointing``):
  one SGD step (forward, backward, momentum update) on crops of the recipe's size; on 2 or more GPUs add the
  ``+ ddp buckets`` row, DistributedDataParallel's gradient buckets (one more fp32 copy of the gradients, held for
  the whole run);
* ``eval``: the training weights and momentum resident, an inference copy, one val batch at the dataset's
  largest image size (Pascal VOC 500x500, Cityscapes 1024x2048) and the recipe's val batch;
* ``select``: the three ST++ snapshots on the device, one inference batch (``--inference_batch_size`` 8);
* ``label``: the teacher and one TTA batch (5 scales up to 2x, each with its flip) of the inference batch, in the
  passes the package splits it into (``tta_pseudo_labels``: a 1024x2048 Cityscapes image is one pass).

bf16 runs CPU autocast's policy. It keeps a few operators in fp32 that CUDA's autocast runs in bf16 (bilinear
upsampling among them), so the bf16 rows are an upper bound for a GPU; ``--cuda_forward`` prints, for the bf16
step, the bytes kept for backward under CUDA's policy (a fake-CUDA forward; a backward needs a real GPU).

    python benchmarks/bench_memory.py                       # every recipe, 1/2/4/8 GPUs, plus the check
    python benchmarks/bench_memory.py --recipes pascal-92-r101 --gpus 1 --phases train
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import time
from pathlib import Path

import torch
import yaml
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stpp_hf import build_model
from stpp_hf.training.pseudo_labeling import tta_pseudo_labels
from stpp_hf.training.recipe import DEEPLABV2_BACKBONE, RECIPE_DEFAULTS
from stpp_hf.training.trainer import build_optimizer

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
NUM_CLASSES = {"pascal": 21, "cityscapes": 19}
# the largest image of each dataset: what evaluation, selection and labeling must fit
LARGEST_IMAGE = {"pascal": (500, 500), "cityscapes": (1024, 2048)}
NUM_SNAPSHOTS = 3  # ST++ selection scores with the snapshots at 1/3, 2/3 and 3/3 of SupOnly
GPU_SIZES_GB = (16, 24, 40, 48, 80)
GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage created by an operator while it is alive; ``peak`` is their maximum.

    Frees are noticed at the next operator (a storage's weak reference has expired), which is when an allocator
    could reuse the memory, so the peak is the one an allocator sees.
    """

    def __init__(self, resident=()):
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = self.peak = 0
        # storages already resident (weights, buffers, momentum) count 0 when an in-place operator returns them
        self.resident = {StorageWeakRef(tensor.untyped_storage()).cdata for tensor in resident}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._forget_freed()
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        reference = StorageWeakRef(storage)
        if reference.cdata in self.alive or reference.cdata in self.resident:
            return
        nbytes = storage.nbytes()
        self.alive[reference.cdata] = (reference, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _forget_freed(self) -> None:
        for key in [key for key, (reference, _) in self.alive.items() if reference.expired()]:
            self.live -= self.alive.pop(key)[1]


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def resident_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Weights, buffers and (with ``optimizer``) its state: what a phase starts with on the device."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value)]
    return tensors


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    return tensor_bytes(resident_tensors(model, optimizer))


def make_model(spec: dict, checkpointing: bool = False, fake: bool = True) -> torch.nn.Module:
    """The recipe's network in training mode; ``fake``: inside :class:`FakeMode`, its tensors fake too."""
    torch.manual_seed(0)
    kwargs = {"num_labels": spec["num_labels"], "backbone": spec["backbone"], "output_stride": spec["output_stride"]}
    if fake:
        # timm's constructors read tensor values (ConvNeXt's and the ViTs' drop-path rates), which fake tensors lack:
        # the network is built on the meta device outside the fake mode, then its tensors get fake storage
        with unset_fake_temporarily(), torch.device("meta"):
            model = build_model(spec["model"], **kwargs)
        model.to_empty(device="cpu")
    else:
        model = build_model(spec["model"], **kwargs)
    if checkpointing:
        model.activation_checkpointing_enable()
    return model.train()


def precision_context(bf16: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def training_step(model, optimizer, images, labels, bf16: bool) -> None:
    """The trainer's step: forward with the loss under autocast, backward, SGD, gradients set to None."""
    with precision_context(bf16):
        loss = model(pixel_values=images, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def gradient_bucket_bytes(spec: dict) -> int:
    """DistributedDataParallel's buckets on each device: a copy of every gradient (``gradient_as_bucket_view`` off,
    its default and the package's)."""
    with FakeMode():
        return tensor_bytes(parameter for parameter in make_model(spec).parameters() if parameter.requires_grad)


def step_peak(spec: dict, batch: int, bf16: bool, checkpointing: bool) -> int:
    """Peak bytes of one training step at per-device batch ``batch``, on fake tensors."""
    with FakeMode():
        model = make_model(spec, checkpointing)
        optimizer = build_optimizer(model, lr=0.01, fused=False)
        crop = spec["crop_size"]
        images = torch.randn(batch, 3, crop, crop)
        labels = torch.randint(0, spec["num_labels"], (batch, crop, crop))
        training_step(model, optimizer, images, labels, bf16)  # the momentum buffers now exist
        resident = resident_tensors(model, optimizer)
        with LiveBytes(resident) as counter:
            training_step(model, optimizer, images, labels, bf16)
    return tensor_bytes(resident) + counter.peak


def inference_peak(spec: dict, phase: str) -> int:
    """Peak bytes of evaluation, selection or TTA labeling (see the module docstring), on fake tensors."""
    height, width = LARGEST_IMAGE[spec["dataset"]]
    with FakeMode():
        model = make_model(spec)
        resident = 0
        if phase == "eval":
            optimizer = build_optimizer(model, lr=0.01, fused=False)
            for parameter in model.parameters():  # the momentum buffers of training stay resident
                optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
            resident = resident_bytes(model, optimizer)
            models, batch = [model.eval()], spec["val_batch_size"]
        elif phase == "select":
            models, batch = (
                [model.eval()] + [make_model(spec).eval() for _ in range(NUM_SNAPSHOTS - 1)],
                spec["inference_batch_size"],
            )
        else:
            models, batch = [model.eval()], spec["inference_batch_size"]
        # the inference copies (eval, selection, labeling run a BN-folded copy; its weights are counted unfolded)
        resident += sum(resident_bytes(m) for m in models)
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad(), LiveBytes() as counter:
            for network in models:
                if phase == "label":
                    tta_pseudo_labels(network, images)  # in the package's passes (TTA_ELEMENTS_BUDGET)
                else:
                    network(pixel_values=images).logits.argmax(dim=1)
    return resident + counter.peak


class FakeMode(contextlib.ExitStack):
    """Fake CPU tensors for everything created inside (the model too)."""

    def __enter__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        super().__enter__()
        self.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        return self


def recipe_specs(names: list[str] | None) -> dict[str, dict]:
    """``{recipe file stem: network and sizes}`` of examples/recipes/ (the recipe's defaults filled in)."""
    specs = {}
    for path in sorted(RECIPES.glob("*.yaml")):
        if names and path.stem not in names:
            continue
        recipe = yaml.safe_load(path.read_text())
        dataset, model = recipe["dataset"], recipe.get("model", "deeplabv3plus")
        defaults = RECIPE_DEFAULTS[dataset]
        backbone = recipe.get("backbone") or (DEEPLABV2_BACKBONE if model == "deeplabv2" else defaults.backbone)
        specs[path.stem] = {
            "dataset": dataset,
            "model": model,
            "backbone": backbone,
            "output_stride": recipe.get("output_stride", defaults.output_stride),
            "num_labels": NUM_CLASSES[dataset],
            "crop_size": recipe.get("crop_size", defaults.crop_size),
            "global_batch_size": recipe.get("global_batch_size", defaults.global_batch_size),
            "val_batch_size": recipe.get("val_batch_size", defaults.val_batch_size),
            "inference_batch_size": recipe.get("inference_batch_size", 8),
        }
    return specs


TRAIN_VARIANTS = {  # name: (bf16, checkpointing)
    "train fp32": (False, False),
    "train bf16": (True, False),
    "train ckpt": (False, True),
    "train ckpt bf16": (True, True),
}


def measure(specs: dict[str, dict], gpus: list[int], phases: list[str]) -> dict[str, dict]:
    """``{recipe: {phase: {gpus: bytes}}}``; recipes with the same network and sizes are counted once."""
    cache: dict[str, dict] = {}
    results = {}
    for name, spec in specs.items():
        key = json.dumps(spec, sort_keys=True)
        if key not in cache:
            started, rows = time.perf_counter(), collections.defaultdict(dict)
            if "train" in phases:
                for variant, (bf16, checkpointing) in TRAIN_VARIANTS.items():
                    for count in gpus:
                        batch = spec["global_batch_size"] // count
                        rows[variant][count] = step_peak(spec, batch, bf16, checkpointing)
                        print(f"  {name} {variant} batch {batch}: {rows[variant][count] / GIB:.2f} GiB", flush=True)
                buckets = gradient_bucket_bytes(spec)  # a training row's addition on 2 or more GPUs
                rows["+ ddp buckets"] = {count: buckets if count > 1 else 0 for count in gpus}
            for phase in ("eval", "select", "label"):
                if phase in phases:
                    peak = inference_peak(spec, phase)
                    print(f"  {name} {phase}: {peak / GIB:.2f} GiB", flush=True)
                    rows[phase] = {count: peak for count in gpus}  # one image batch per device whatever the count
            cache[key] = dict(rows)
            print(f"  counted {name} ({spec['model']} {spec['backbone']}) in {time.perf_counter() - started:.0f} s")
        results[name] = cache[key]
    return results


def fits(nbytes: int) -> str:
    """The smallest GPU size of :data:`GPU_SIZES_GB` the bytes fit in (GB = 1e9 bytes, as cards are sold)."""
    for size in GPU_SIZES_GB:
        if nbytes <= size * 1e9:
            return f"{size} GB"
    return f"> {GPU_SIZES_GB[-1]} GB"


def print_tables(results: dict[str, dict], gpus: list[int]) -> None:
    print("\nGiB per device (smallest card that holds it, GB = 1e9 bytes)")
    header = f"{'recipe':<26} {'phase':<16}" + "".join(f"{f'{count} GPU':>20}" for count in gpus)
    print(header)
    for name, rows in results.items():
        for phase, by_count in rows.items():
            cells = "".join(f"{f'{by_count[c] / GIB:.2f} ({fits(by_count[c])})':>20}" for c in gpus)
            print(f"{name:<26} {phase:<16}{cells}")


def cuda_forward_kept(spec: dict, batch: int) -> tuple[int, int]:
    """Bytes alive after the bf16 forward with the loss (kept for backward) under (CPU, CUDA) autocast, on fake
    tensors (a fake-CUDA forward runs without a GPU; its backward does not)."""
    kept = []
    for device in ("cpu", "cuda"):
        with FakeMode(), torch.device(device):
            model = make_model(spec)
            crop = spec["crop_size"]
            images = torch.randn(batch, 3, crop, crop)
            labels = torch.randint(0, spec["num_labels"], (batch, crop, crop))
            with LiveBytes() as counter:
                with precision_context(True, device):
                    loss = model(pixel_values=images, labels=labels).loss
                counter._forget_freed()
                kept.append(counter.live)
            del loss
    return kept[0], kept[1]


def allocator_check(batch: int = 2, size: int = 65) -> None:
    """The counter against the CPU allocator's peak on a real fp32 step, and fake against real tensors.

    oneDNN is off for it (``torch.backends.mkldnn.flags(enabled=False)``): its convolutions keep reordered weight
    copies and scratch buffers that are not tensors (with it on, the allocator's peak was 1.3-1.5x the tensors' at
    65 px), while a GPU's convolutions run through cuDNN, whose workspaces the counter does not claim to count.
    """
    from torch.profiler import ProfilerActivity, profile

    spec = {"model": "deeplabv3plus", "backbone": "resnet50", "output_stride": 8, "num_labels": 21}
    print(f"\ncheck: DeepLabV3+ ResNet-50, output stride 8, batch {batch}, {size}-px crops, fp32 SGD step, no oneDNN")
    for checkpointing in (False, True):
        with torch.backends.mkldnn.flags(enabled=False):
            model = make_model(spec, checkpointing, fake=False)
            optimizer = build_optimizer(model, lr=0.01, fused=False)
            generator = torch.Generator().manual_seed(0)
            images = torch.randn(batch, 3, size, size, generator=generator)
            labels = torch.randint(0, 21, (batch, size, size), generator=generator)
            training_step(model, optimizer, images, labels, bf16=False)  # the momentum buffers now exist
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                training_step(model, optimizer, images, labels, bf16=False)
            # the profiler's memory events carry the allocator's running total since the profiler started
            totals = [event.total_allocated for event in _memory_events(profiler)]
            allocator = max(totals) - min(0, min(totals))
            with LiveBytes(resident_tensors(model, optimizer)) as counter:
                training_step(model, optimizer, images, labels, bf16=False)
        spec_sized = {**spec, "crop_size": size}
        fake = step_peak(spec_sized, batch, bf16=False, checkpointing=checkpointing) - resident_bytes(model, optimizer)
        within = abs(counter.peak / allocator - 1) <= 0.05 and abs(fake / counter.peak - 1) <= 0.05
        print(
            f"  checkpointing {'on ' if checkpointing else 'off'}: allocator peak above resident "
            f"{allocator / 2**20:.1f} MiB, counted (real tensors) {counter.peak / 2**20:.1f} MiB "
            f"({counter.peak / allocator:.3f}x), counted (fake tensors) {fake / 2**20:.1f} MiB "
            f"({fake / counter.peak:.3f}x of real): {'within' if within else 'NOT within'} 5 %"
        )


def _memory_events(profiler):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        profiler.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    return [
        argparse.Namespace(total_allocated=event["args"]["Total Allocated"])
        for event in events
        if event.get("name") == "[memory]"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", help="recipe file stems (default: all of examples/recipes/)")
    parser.add_argument("--gpus", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--phases", nargs="*", default=["train", "eval", "select", "label"])
    parser.add_argument("--no_check", action="store_true", help="skip the allocator check")
    parser.add_argument("--check_size", type=int, default=65, help="crop size of the allocator check (batch 2)")
    parser.add_argument("--cuda_forward", action="store_true", help="bf16 kept-for-backward bytes, CPU vs CUDA")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, CPU {platform.processor() or platform.machine()}, "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    if not args.no_check:
        allocator_check(size=args.check_size)
    specs = recipe_specs(args.recipes)
    if args.cuda_forward:
        for name, spec in specs.items():
            cpu, cuda = cuda_forward_kept(spec, spec["global_batch_size"])
            print(f"  {name}: bf16 forward keeps {cpu / GIB:.2f} GiB (CPU autocast) vs {cuda / GIB:.2f} GiB (CUDA)")
    results = measure(specs, args.gpus, args.phases)
    print_tables(results, args.gpus)


if __name__ == "__main__":
    main()
