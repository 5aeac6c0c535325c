#!/usr/bin/env python
"""One command for a machine with a CUDA GPU (sized for under 8 minutes on one CUDA GPU), whose numbers can be trusted:
every timing follows warm-up passes, each part runs on its own (one that fails is reported and the others still
run), and every figure is printed with the hardware beside it and written to a JSON file as the parts finish.

1. environment: GPU name and compute capability, the CPU, torch / CUDA / cuDNN versions, the fp32 convolution
   and matmul precision settings, and which mixed precisions the device computes natively.
2. training: the DeepLabV3+ ResNet-101 step (output stride 8, 321-px crops, per-device batch 8) in true fp32
   (``fp32_precision = "ieee"``), TF32 (``"tf32"``), bf16 and fp16 (autocast; fp16 with a GradScaler, as
   Accelerate does), channels_last off and on: images/s, peak memory, the GradScaler's scale and skipped steps.
3. labeling: TTA pseudo-labeling (5 scales x flip) at Pascal (375x500) and Cityscapes (1024x2048) sizes, the
   package's batched path (BN folded, channels_last) in fp32 (the device's default: TF32 convolutions on CUDA),
   bf16 and fp16, and at Pascal size one image and one flip at a time; the inference copy of the model (with
   its BN-folding probe passes) is made and a warm-up pass run before the clock starts; labels compared.
4. ddp: a 2-process DistributedDataParallel step with SyncBatchNorm (NCCL) when two or more GPUs are visible:
   images/s and whether the replicas' weights and BatchNorm statistics agree afterwards.
5. stpp: ``stpp-train`` on a small built-in dataset through all six ST++ stages, in the mixed precision the device
   computes natively (bf16 from compute capability 8.0, else fp16).

    python benchmarks/gpu_check.py                       # on a CUDA machine; figures also in gpu_check.json
    python benchmarks/gpu_check.py --parts training ddp  # some parts only
    python benchmarks/gpu_check.py --tiny                # a CPU, tiny sizes: every branch a CPU can run (a test)

On a CPU (``--tiny``) TF32 is emulated by rounding the inputs and weights of every convolution to TF32's 10-bit
mantissa (``--emulate_tf32`` also runs labeling and the ST++ run that way, as CUDA's default does), fp16 runs
under CPU autocast with the CPU GradScaler, and the ddp part runs 2 gloo processes without SyncBatchNorm (it
needs a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_recipe import reference_tta_label, smooth_images
from bench_training import synchronize
from hardware import beside, hardware, print_hardware

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the TF32 emulation the tests use too
from tf32_emulation import emulated_tf32_convolutions  # noqa: E402

from stpp_hf import build_model
from stpp_hf.file_io import atomic_write_json
from stpp_hf.training.inference import inference_model, same_size_batches, to_device_images
from stpp_hf.training.precision import decide_precision, describe_device
from stpp_hf.training.pseudo_labeling import tta_pseudo_labels
from stpp_hf.training.results import RunResults
from stpp_hf.training.trainer import build_optimizer

PARTS = ("environment", "training", "labeling", "ddp", "stpp")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# training rows: (name, fp32 convolution / matmul precision, autocast dtype); None: the device's default
TRAINING_PRECISIONS = (("fp32", "ieee", None), ("tf32", "tf32", None), ("bf16", None, "bf16"), ("fp16", None, "fp16"))
NUM_LABELS = 21


def recipe(tiny: bool) -> dict:
    """The sizes of every part (``tiny``: seconds on a CPU)."""
    if tiny:
        return dict(backbone="resnet18", output_stride=16, crop=48, batch=2, warmup=1, steps=1, pascal=(40, 56),
                    pascal_images=2, cityscapes=(32, 64), cityscapes_images=1, ddp_steps=1)  # fmt: skip
    return dict(backbone="resnet101", output_stride=8, crop=321, batch=8, warmup=2, steps=5, pascal=(375, 500),
                pascal_images=8, cityscapes=(1024, 2048), cityscapes_images=2, ddp_steps=5)  # fmt: skip


# ---- fp32 precision: CUDA's settings, or TF32 emulated on a CPU ---------------------------------------------


@contextlib.contextmanager
def fp32_precision(device: torch.device, mode: str | None, emulate_default: bool = False):
    """fp32 convolutions and matmuls in ``mode`` (``"ieee"``: true fp32, ``"tf32"``), or (``None``) the device's
    default: CUDA's settings as they are, on a CPU exact fp32 unless ``emulate_default`` (TF32, as on CUDA)."""
    if device.type == "cuda":
        if mode is None:
            yield
            return
        settings = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
        before = [setting.fp32_precision for setting in settings]
        try:
            for setting in settings:
                setting.fp32_precision = mode
            yield
        finally:
            for setting, value in zip(settings, before):
                setting.fp32_precision = value
        return
    # the emulation rounds while cuDNN's fp32 precision says "tf32" (the default): the folding check's full-fp32
    # probes switch it to "ieee", as on CUDA
    emulate = mode == "tf32" or (mode is None and emulate_default)
    with emulated_tf32_convolutions() if emulate else contextlib.nullcontext():
        yield


def autocast(device: torch.device, precision: str | None):
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ---- the parts -------------------------------------------------------------------------------------------


def environment(settings, device, args) -> dict:
    facts = describe_device(device)
    support = {name: decide_precision(name, [facts]).native for name in AUTOCAST_DTYPES}
    result = {
        "hardware": hardware(str(device)),
        "device": facts.to_json(),
        "native_mixed_precision": support,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "visible_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "fp32_precision": {
            "cudnn.conv": torch.backends.cudnn.conv.fp32_precision,
            "cuda.matmul": torch.backends.cuda.matmul.fp32_precision,
        },
        "cpu_tf32_emulated": device.type == "cpu" and args.emulate_tf32,
    }
    print(beside(f"environment: {json.dumps(result)}"), flush=True)
    return result


def new_model(settings, device, memory_format=torch.contiguous_format) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "deeplabv3plus", num_labels=NUM_LABELS, backbone=settings["backbone"], output_stride=settings["output_stride"]
    )
    return model.to(device, memory_format=memory_format)


def training(settings, device, args) -> list[dict]:
    """Images/s, peak memory and the GradScaler's state of the training step per precision and memory format."""
    generator = torch.Generator().manual_seed(0)
    size, batch = settings["crop"], settings["batch"]
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, NUM_LABELS, (batch, size, size), generator=generator).to(device)
    rows = []
    for name, mode, precision in TRAINING_PRECISIONS:
        for channels_last in (False, True):
            row = dict(precision=name, channels_last=channels_last)
            try:
                row.update(_training_row(settings, device, args, images, labels, mode, precision, channels_last))
            except Exception as error:  # one row's failure (e.g. out of memory) leaves the others
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            memory = row.get("peak_memory_gib")
            figures = (
                f"{row['images_per_s']:8.2f} img/s  peak {'n/a' if memory is None else f'{memory:.2f} GiB'}"
                + (f"  scale {row['grad_scale']:g}, skipped {row['skipped_steps']}" if name == "fp16" else "")
                if "error" not in row
                else f"FAILED {row['error']}"
            )
            print(beside(f"train step {name:>4} channels_last={channels_last!s:<5} {figures}"), flush=True)
    return rows


def _training_row(settings, device, args, images, labels, mode, precision, channels_last) -> dict:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = new_model(settings, device, memory_format).train()
    inputs = images.contiguous(memory_format=memory_format)
    optimizer = build_optimizer(model, 1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scales = []

    def step():
        with autocast(device, precision):
            loss = model(pixel_values=inputs, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale() if scaler.is_enabled() else 1.0)
        return loss

    with fp32_precision(device, mode, args.emulate_tf32):
        for _ in range(settings["warmup"]):  # kernel selection, the allocator, the scaler's first scale
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(settings["steps"]):
            loss = step()
        synchronize(device)
        seconds = (time.perf_counter() - start) / settings["steps"]
    finite = torch.isfinite(loss).item() and all(torch.isfinite(p).all().item() for p in model.parameters())
    if not finite:
        raise RuntimeError(f"non-finite loss ({loss.item()}) or weights after {len(scales)} steps")
    return dict(
        images_per_s=settings["batch"] / seconds,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        grad_scale=scales[-1],
        skipped_steps=sum(after < before for before, after in zip([scales[0], *scales], scales)),
        final_loss=loss.item(),
    )


def labeling(settings, device, args) -> dict:
    """TTA labeling images/s at Pascal and Cityscapes sizes: batched per precision, and (Pascal) one image and one
    flip at a time; the model copy, its probe passes and a warm-up pass stay outside the clock."""
    results = {}
    for dataset_name in ("pascal", "cityscapes"):
        height, width = settings[dataset_name]
        images = smooth_images(settings[f"{dataset_name}_images"], height, width, torch.Generator().manual_seed(1))
        model = _calibrated_model(settings, device, images[:1])
        rows, reference_labels = {}, None
        variants = [("batched", precision) for precision in ("fp32", *AUTOCAST_DTYPES)]
        if dataset_name == "pascal":
            variants.append(("batch-1", "fp32"))
        for kind, precision in variants:
            name = f"{kind} {precision}"
            try:
                with fp32_precision(device, None, args.emulate_tf32):
                    seconds, labels = _time_labeling(model, images, device, kind, precision)
                rows[name] = {"images_per_s": len(images) / seconds}
                if reference_labels is None:
                    reference_labels = labels
                equal = sum((a == b).sum().item() for a, b in zip(labels, reference_labels))
                rows[name]["labels_equal_to_batched_fp32_pct"] = 100 * equal / (len(images) * height * width)
                figures = (
                    f"{rows[name]['images_per_s']:8.3f} img/s, labels equal to batched fp32 on "
                    f"{rows[name]['labels_equal_to_batched_fp32_pct']:.3f}% of pixels"
                )
            except Exception as error:
                rows[name] = {"error": f"{type(error).__name__}: {error}"}
                figures = f"FAILED {rows[name]['error']}"
            print(beside(f"TTA labeling {dataset_name} {height}x{width} {name:<13} {figures}"), flush=True)
        results[dataset_name] = {"image_size": [height, width], "num_images": len(images), "rows": rows}
    return results


@torch.no_grad()
def _calibrated_model(settings, device, probe):
    """A random model whose class scores spread over a few units, as a trained model's do (a random deep
    network's run into the thousands, which would make every comparison of logits meaningless)."""
    model = new_model(settings, device).eval()
    scale = model(pixel_values=probe.to(device)).logits.std() / 3
    model.classifier.weight /= scale
    model.classifier.bias /= scale
    return model


def _time_labeling(model, images, device, kind, precision) -> tuple[float, list[torch.Tensor]]:
    if kind == "batch-1":

        def label(batch):
            return [
                reference_tta_label(lambda x: model(pixel_values=x).logits, image.to(device)).cpu() for image in batch
            ]
    else:
        folded = inference_model(model, device, images[:1])  # the model copy and its BN-folding probe passes

        def label(batch):
            dataset = [(image, None) for image in batch]
            labels = []
            for _, stacked, _ in same_size_batches(dataset, range(len(dataset)), batch_size=1):
                with autocast(device, precision):
                    labels.extend(tta_pseudo_labels(folded, to_device_images(stacked, device)).to(torch.uint8))
            return labels

    with torch.no_grad():
        label(images[:1])  # warm-up at the same size: kernel selection, the allocator
        synchronize(device)
        start = time.perf_counter()
        labels = label(images)
        synchronize(device)
    return time.perf_counter() - start, [torch.as_tensor(label).long() for label in labels]


def ddp(settings, device, args) -> dict:
    """One DDP (+ SyncBatchNorm on CUDA) training step in 2 processes; replicas compared afterwards."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs two or more GPUs; {torch.cuda.device_count()} visible"}
    with tempfile.TemporaryDirectory() as results_dir:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        start = time.perf_counter()
        torch.multiprocessing.spawn(
            _ddp_worker, args=(2, port, settings, device.type, results_dir), nprocs=2, join=True
        )
        ranks = [json.loads((Path(results_dir) / f"{rank}.json").read_text()) for rank in range(2)]
    result = {
        "backend": ranks[0]["backend"],
        "sync_batchnorm": ranks[0]["sync_batchnorm"],
        "images_per_s": sum(rank["images_per_s"] for rank in ranks),
        "weights_equal_across_ranks": ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"],
        "bn_statistics_equal_across_ranks": ranks[0]["bn_checksum"] == ranks[1]["bn_checksum"],
        "wall_time_s": time.perf_counter() - start,
    }
    if not result["weights_equal_across_ranks"]:
        raise RuntimeError(f"DDP replicas differ after the step: {ranks}")
    print(beside(f"DDP 2 processes: {json.dumps(result)}"), flush=True)
    return result


def _ddp_worker(rank, world_size, port, settings, device_type, results_dir):
    import torch.distributed as dist

    cuda = device_type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # the two processes share the cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        model = new_model(settings, device).train()
        if cuda:  # SyncBatchNorm runs on GPUs only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        optimizer = build_optimizer(model, 1e-3)
        generator = torch.Generator().manual_seed(rank)  # each rank its own images
        size, batch = settings["crop"], settings["batch"]
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        labels = torch.randint(0, NUM_LABELS, (batch, size, size), generator=generator).to(device)

        def step():
            wrapped(pixel_values=images, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(settings["warmup"]):
            step()
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(settings["ddp_steps"]):
            step()
        synchronize(device)
        seconds = (time.perf_counter() - start) / settings["ddp_steps"]
        bn_statistics = [b for name, b in model.named_buffers() if name.endswith("running_mean")]
        result = {
            "backend": backend,
            "sync_batchnorm": cuda,
            "images_per_s": batch / seconds,
            "weights_checksum": repr([p.double().sum().item() for p in model.parameters()]),
            "bn_checksum": repr([b.double().sum().item() for b in bn_statistics]),
        }
        atomic_write_json(Path(results_dir) / f"{rank}.json", result)
    finally:
        dist.destroy_process_group()


def stpp(settings, device, args) -> dict:
    """All six ST++ stages of ``stpp-train`` in the device's native mixed precision, in this process."""
    from stpp_hf.training import cli

    facts = describe_device(device)
    native = [name for name in ("bf16", "fp16") if decide_precision(name, [facts]).native]
    precision = native[0] if native else "bf16"
    if not native and not args.allow_emulated_precision:
        return {"skipped": f"{facts.summary()} computes neither bf16 nor fp16 natively (--allow_emulated_precision)"}
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="gpu_check_")) / f"stpp_{precision}"
    size = ["--synthetic_num_labeled", "4", "--synthetic_num_unlabeled", "4", "--synthetic_num_val", "2",
            "--synthetic_image_size", "32", "--epochs", "3", "--global_batch_size", "2", "--crop_size", "32",
            "--base_size", "32", "--inference_batch_size", "4",
            "--val_batch_size", "2"] if args.tiny else ["--epochs", "3"]  # fmt: skip
    argv = ["--output_dir", str(output_dir), "--mixed_precision", precision, "--report_to", "none", *size]
    if args.allow_emulated_precision:
        argv.append("--allow_emulated_precision")
    start = time.perf_counter()
    with fp32_precision(device, None, args.emulate_tf32):
        cli.main(argv)
    results = RunResults.read(output_dir)
    result = dict(
        mixed_precision=precision,
        native=results.precision["native"],
        wall_time_s=time.perf_counter() - start,
        stages=[(stage.name, stage.val_miou) for stage in results.stages],
        final_val_miou=results.final.val_miou,
    )
    print(beside(f"ST++ {precision} run: {json.dumps(result)}"), flush=True)
    return result


def _failed_rows(result) -> bool:
    """Whether a row of a part's result holds an error (a row fails alone, the part goes on)."""
    if isinstance(result, dict):
        return "error" in result or any(_failed_rows(value) for value in result.values())
    if isinstance(result, list):
        return any(_failed_rows(value) for value in result)
    return False


# ---- main ------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes, any device: checks that every part runs.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--json", default="gpu_check.json", help="Where every figure is written (after each part).")
    parser.add_argument("--output_dir", default=None, help="Where the ST++ run goes (default: a temporary one).")
    parser.add_argument(
        "--emulate_tf32",
        action="store_true",
        help="On a CPU: run labeling and the ST++ run with TF32 convolutions emulated, as CUDA's default does.",
    )
    parser.add_argument(
        "--allow_emulated_precision",
        action="store_true",
        help="Let the ST++ run use bf16 where the device does not compute it natively (a CPU without avx512_bf16).",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error("without CUDA, run with --tiny (the full check is sized for a GPU)")
    if args.emulate_tf32 and device.type == "cuda":
        parser.error("--emulate_tf32 is for a CPU: CUDA runs TF32 itself")
    settings = recipe(args.tiny)
    print_hardware(device)
    print(f"recipe: {settings}; figures also in {args.json}", flush=True)
    report = {"hardware": hardware(str(device)), "recipe": settings, "parts": {}}
    functions = {"environment": environment, "training": training, "labeling": labeling, "ddp": ddp, "stpp": stpp}
    for name in args.parts:
        start = time.perf_counter()
        try:
            result = functions[name](settings, device, args)
            entry = {"ok": not _failed_rows(result), "result": result}
        except Exception as error:  # the other parts still run and print
            traceback.print_exc()
            entry = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            print(beside(f"{name}: FAILED {entry['error']}"), flush=True)
        entry["seconds"] = time.perf_counter() - start
        report["parts"][name] = entry
        atomic_write_json(args.json, report)
    failed = [name for name, entry in report["parts"].items() if not entry["ok"]]
    print(f"parts failed: {', '.join(failed) or 'none'}; figures in {args.json}", flush=True)
    return report


if __name__ == "__main__":
    raise SystemExit(1 if any(not entry["ok"] for entry in main()["parts"].values()) else 0)
