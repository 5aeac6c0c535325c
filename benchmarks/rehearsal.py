#!/usr/bin/env python
"""A rehearsal of a Pascal run at the real sizes, on CPU, before a GPU is lent: the ST++ pipeline of
examples/recipes/pascal-92-r101.yaml (DeepLabV3+ ResNet-101, output stride 8, 321-px crops, global batch 16,
by 8 accumulation steps of 2 images) through every stage on generated images of VOC size (500x500, the
largest VOC image side; the package's synthetic generator in VOC layout), the fewest epochs ST++ allows (3),
printing each phase's time and peak resident memory (the process's VmHWM, reset per phase), so that
size-dependent failures show before a long run. Not a test: it takes long on a CPU.

    python benchmarks/rehearsal.py                               # the recipe: ResNet-101, 16 + 16 images
    python benchmarks/rehearsal.py --backbone resnet18           # the same sizes, a faster network
    python benchmarks/rehearsal.py --num_labeled 2 --num_unlabeled 2 --num_val 1 --accumulation 1 \
        --global_batch_size 2                                     # fewest images; other options go to stpp-train
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
import tempfile
import time
from pathlib import Path

import torch

from stpp_hf.data import make_synthetic_dataset
from stpp_hf.training import cli, pipeline, trainer

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "pascal-92-r101.yaml"


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size starts again from now


class PhaseLog:
    """Wraps the pipeline's phase functions to print their wall time and peak resident memory (a phase's peak
    includes those of the phases it calls)."""

    def __init__(self):
        self.peaks: list[float] = []  # per open phase, the highest peak seen before its last reset

    def wrap(self, module, name: str, label: str) -> None:
        function = getattr(module, name)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self.peaks:
                self.peaks[-1] = max(self.peaks[-1], peak_rss_mib())
            self.peaks.append(0.0)
            reset_peak_rss()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds, peak = time.perf_counter() - started, max(peak_rss_mib(), self.peaks.pop())
                if self.peaks:
                    self.peaks[-1] = max(self.peaks[-1], peak)
                indent = "  " * len(self.peaks)
                print(f"{indent}[phase] {label}: {seconds:.1f} s, peak RSS {peak:.0f} MiB", flush=True)

        setattr(module, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--image_size", type=int, default=500)
    parser.add_argument("--num_labeled", type=int, default=16)
    parser.add_argument("--num_unlabeled", type=int, default=16)
    parser.add_argument("--num_val", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=8, help="accumulation steps of the global batch 16")
    parser.add_argument("--output_dir", default=None, help="default: a temporary directory")
    args, train_options = parser.parse_known_args()  # the rest are stpp-train options, given after the recipe's
    print(
        f"torch {torch.__version__}, {platform.machine()} {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.output_dir or scratch)
        data = make_synthetic_dataset(
            root / "data",
            num_labeled=args.num_labeled,
            num_unlabeled=args.num_unlabeled,
            num_val=args.num_val,
            image_size=args.image_size,
        )
        log = PhaseLog()
        log.wrap(pipeline, "train_stage", "training stage")
        log.wrap(trainer, "evaluate", "val evaluation")
        log.wrap(pipeline, "compute_reliability", "selection")
        log.wrap(pipeline, "label_images", "TTA labeling")
        log.wrap(pipeline, "evaluate", "evaluation")
        argv = [
            str(RECIPE),
            "--data_root", str(data.root),
            "--labeled_id_path", str(data.split_files["labeled"]),
            "--unlabeled_id_path", str(data.split_files["unlabeled"]),
            "--val_id_path", str(data.split_files["val"]),
            "--backbone", args.backbone,
            "--backbone_weights", "none",
            "--epochs", "3",
            "--gradient_accumulation_steps", str(args.accumulation),
            "--output_dir", str(root / "run"),
            "--report_to", "none",
            *train_options,
        ]  # fmt: skip
        started = time.perf_counter()
        cli.main(argv)
        print(f"whole run: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
