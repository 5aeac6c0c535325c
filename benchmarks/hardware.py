"""The hardware every benchmark names beside its figures: the CPU's capability (and flags), and on CUDA the GPU's
name and compute capability (``stpp_hf.training.precision.describe_device``)."""

from __future__ import annotations

import functools

import torch

from stpp_hf.training.precision import describe_device


@functools.lru_cache(maxsize=None)
def hardware(device: str = "cpu") -> str:
    """The full line, e.g. ``"CPU AMD EPYC (x86_64, AVX2; no avx512_bf16 / amx_bf16)"``."""
    return describe_device(device).summary()


@functools.lru_cache(maxsize=None)
def tag(device: str = "cpu") -> str:
    """The short form printed beside each figure: ``"[CPU AVX2]"``, ``"[NVIDIA A100-SXM4-80GB cc 8.0, CPU AVX2]"``."""
    facts = describe_device(device)
    cpu = f"CPU {facts.cpu_capability}"
    if facts.compute_capability is None:
        return f"[{cpu}]"
    major, minor = facts.compute_capability
    return f"[{facts.name} cc {major}.{minor}, {cpu}]"


_measured_on = {"device": "cpu"}  # the device that print_hardware named last: the one the figures come from


def beside(text: str, device: torch.device | str | None = None) -> str:
    """``text`` with the hardware tag after each of its lines (``device``: the one :func:`print_hardware` named)."""
    name = str(torch.device(device)) if device is not None else _measured_on["device"]
    return "\n".join(f"{line}  {tag(name)}" if line.strip() else line for line in text.split("\n"))


def print_hardware(device: torch.device | str = "cpu") -> None:
    """Print the full hardware line; later :func:`beside` calls tag their figures with ``device``."""
    _measured_on["device"] = str(torch.device(device))
    print(f"hardware: {hardware(_measured_on['device'])}; torch {torch.__version__}", flush=True)
