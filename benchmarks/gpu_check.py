#!/usr/bin/env python
"""One command for a GPU session (under 8 minutes on one CUDA GPU): what mixed precision, channels_last and
batched TTA buy at the method's recipe, and a short ST++ run in bf16 through every stage.

1. Training step of DeepLabV3+ ResNet-101, output stride 8, 321-px crops, per-device batch 8, in fp32, bf16 and
   fp16 (autocast; fp16 with a gradient scaler, as Accelerate does), channels_last on and off: images/s and
   peak memory.
2. TTA pseudo-labeling of Pascal-sized images (375x500): ``label_images`` batched (flip + same-size images)
   vs one image and one flip at a time, images/s, in the trainer's fp32, with the labels compared.
3. ``examples/train_stpp.py --mixed_precision bf16`` on a small built-in dataset, all six ST++ stages.

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --tiny          # seconds on a CPU: the same code paths, tiny sizes (a test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_recipe import _AutocastDevice, reference_tta_label, smooth_images
from bench_training import _MemoryStore, synchronize

from stpp_hf import build_model
from stpp_hf.training.pseudo_labeling import label_images
from stpp_hf.training.results import RunResults
from stpp_hf.training.trainer import build_optimizer

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def recipe(tiny: bool) -> dict:
    if tiny:
        return dict(backbone="resnet18", output_stride=16, crop=48, batch=2, steps=1, image=(40, 56), images=2)
    return dict(backbone="resnet101", output_stride=8, crop=321, batch=8, steps=5, image=(375, 500), images=8)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def training_steps(settings, device) -> list[dict]:
    """Images/s and peak memory of the training step per precision and memory format."""
    generator = torch.Generator().manual_seed(0)
    size, batch = settings["crop"], settings["batch"]
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, 21, (batch, size, size), generator=generator).to(device)
    rows = []
    for precision, dtype in PRECISIONS.items():
        if dtype == torch.float16 and device.type != "cuda":
            continue  # fp16 autocast with a gradient scaler is a CUDA recipe
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = build_model(
                "deeplabv3plus", num_labels=21, backbone=settings["backbone"], output_stride=settings["output_stride"]
            )
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(device, memory_format=memory_format).train()
            inputs = images.contiguous(memory_format=memory_format)
            optimizer = build_optimizer(model, 1e-3)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
            autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

            def step():
                with autocast:
                    loss = model(pixel_values=inputs, labels=labels).loss
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                return loss

            loss = step()  # warm-up: kernel selection, allocator
            reset_peak_memory(device)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(settings["steps"]):
                loss = step()
            synchronize(device)
            seconds = (time.perf_counter() - start) / settings["steps"]
            if not torch.isfinite(loss):
                raise RuntimeError(f"{precision} channels_last={channels_last}: the loss is {loss.item()}")
            rows.append(
                dict(
                    precision=precision,
                    channels_last=channels_last,
                    images_per_s=batch / seconds,
                    peak_memory_gib=peak_memory_gib(device),
                )
            )
    return rows


def labeling(settings, device) -> dict:
    """TTA labeling images/s: batched (``label_images``) vs one image, one flip at a time; label agreement."""
    height, width = settings["image"]
    images = smooth_images(settings["images"], height, width, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = (
        build_model(
            "deeplabv3plus", num_labels=21, backbone=settings["backbone"], output_stride=settings["output_stride"]
        )
        .to(device)
        .eval()
    )
    dataset = [(image, None) for image in images]
    ids = [f"image_{index}" for index in range(len(dataset))]
    store = _MemoryStore()
    results = {}
    for name in ("batch-1", "batched"):
        synchronize(device)
        start = time.perf_counter()
        if name == "batch-1":
            single = [
                reference_tta_label(lambda x: model(pixel_values=x).logits, image.to(device)) for image in images
            ]
        else:
            label_images(model, dataset, ids, store, _AutocastDevice(device, torch.float32), batch_size=len(dataset))
        synchronize(device)
        results[f"{name}_images_per_s"] = len(dataset) / (time.perf_counter() - start)
    equal = sum(
        (torch.as_tensor(store.labels[i]).to(device).long() == label).sum().item() for i, label in zip(ids, single)
    )
    results["labels_equal_pixels_pct"] = 100 * equal / (len(dataset) * height * width)
    return results


def short_stpp_run(tiny: bool, output_dir: Path) -> dict:
    """All six ST++ stages of ``examples/train_stpp.py`` in bf16 on a small built-in dataset."""
    size = ["--synthetic_num_labeled", "4", "--synthetic_num_unlabeled", "4", "--synthetic_num_val", "2",
            "--synthetic_image_size", "32", "--epochs", "3", "--global_batch_size", "2", "--crop_size", "32",
            "--base_size", "32", "--inference_batch_size", "4",
            "--val_batch_size", "2"] if tiny else ["--epochs", "3"]  # fmt: skip
    command = [sys.executable, str(REPO / "examples" / "train_stpp.py"), "--output_dir", str(output_dir),
               "--mixed_precision", "bf16", "--report_to", "none", *size]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    results = RunResults.read(output_dir)
    return dict(
        wall_time_s=time.perf_counter() - start,
        stages=[(stage.name, stage.val_miou) for stage in results.stages],
        final_val_miou=results.final.val_miou,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tiny", action="store_true", help="Tiny sizes, any device: checks that every part still runs."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output_dir", default=None, help="Where the short ST++ run goes (default: a temporary directory)."
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error("without CUDA, run with --tiny (the full check is sized for a GPU)")
    settings = recipe(args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; recipe: {settings}", flush=True)
    report = {"device": name, "training": training_steps(settings, device)}
    for row in report["training"]:
        memory = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f} GiB"
        print(
            f"train step {row['precision']:>4} channels_last={row['channels_last']!s:<5} "
            f"{row['images_per_s']:8.2f} img/s  peak {memory}",
            flush=True,
        )
    report["labeling"] = labeling(settings, device)
    print(f"TTA labeling: {json.dumps(report['labeling'])}", flush=True)
    with tempfile.TemporaryDirectory() as temporary:
        report["stpp_bf16"] = short_stpp_run(args.tiny, Path(args.output_dir or temporary) / "stpp_bf16")
    print(f"ST++ bf16 run: {json.dumps(report['stpp_bf16'])}", flush=True)
    return report


if __name__ == "__main__":
    main()
