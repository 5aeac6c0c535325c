"""Whether ``--mixed_precision`` runs natively on the device of every process, decided before any data work.

Mixed precision only pays where the hardware computes in it. Elsewhere the same flag is accepted by PyTorch and
Accelerate without a word and runs emulated, far slower: on a CPU without oneDNN bf16 kernels (AVX2 only) one
of the recipe's dilated ASPP convolutions (2048 -> 256 channels, 3x3, dilation 12, a 41x41 map, batch 2; torch
2.14) took 138.7 s under bf16 autocast against 0.40 s in fp32, about 350x slower. GPUs before compute capability
8.0 (V100, T4, the 2080 Ti the method was published on) have no bf16 tensor cores; fp16 with loss scaling is
their mixed precision. ``docs/precision.md`` is the user's guide.

:func:`describe_device` reads the facts of one device (:class:`DeviceFacts`); :func:`decide_precision` answers
from the facts of every process, so it needs no hardware to be tested; :func:`gather_precision_decision` runs
both in a launch (every process describes its own device, the facts are gathered, every process reaches the
same verdict and none is left waiting in a collective).
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import ConfigError

OVERRIDE_OPTION = "--allow_emulated_precision"
# CPU flags (Linux /proc/cpuinfo names) that say which reduced precisions the cores compute natively
CPU_PRECISION_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "bf16")
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
X86_FP16_FLAGS = ("avx512_fp16", "amx_fp16")
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores
FP16_MIN_COMPUTE_CAPABILITY = (7, 0)  # Volta: fp16 tensor cores
# the measurement behind the CPU refusal (module docstring)
CPU_BF16_SLOWDOWN = "about 350x slower than fp32 (one dilated ASPP convolution of the recipe: 138.7 s vs 0.40 s)"


class PrecisionError(ConfigError):
    """The requested mixed precision does not run natively on the device of some process."""


@dataclass(frozen=True)
class DeviceFacts:
    """What one process's device says about its precisions.

    ``kind`` is the torch device type (``"cpu"``, ``"cuda"``, ...). The CPU fields describe the host of every
    process (``cpu_flags``: those of :data:`CPU_PRECISION_FLAGS` it reports, ``None`` where the platform does not
    list them); the GPU fields are ``None`` off CUDA.
    """

    kind: str
    name: str
    machine: str  # platform.machine(): x86_64, aarch64, arm64, ...
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, SVE256, ...
    cpu_flags: Optional[tuple[str, ...]] = None
    onednn_bf16: Optional[bool] = None  # torch.ops.mkldnn._is_mkldnn_bf16_supported()
    onednn_fp16: Optional[bool] = None  # torch.ops.mkldnn._is_mkldnn_fp16_supported()
    compute_capability: Optional[tuple[int, int]] = None
    cuda_bf16: Optional[bool] = None  # torch.cuda.is_bf16_supported(including_emulation=False)

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}

    @classmethod
    def from_json(cls, values: dict) -> DeviceFacts:
        values = dict(values)
        for name in ("cpu_flags", "compute_capability"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    def summary(self) -> str:
        """One line: ``"CPU AMD EPYC (x86_64, AVX2; no avx512_bf16 / amx_bf16)"`` or
        ``"CUDA NVIDIA A100-SXM4-80GB (compute capability 8.0); host CPU AVX512"``."""
        cpu = f"{self.machine}, {self.cpu_capability}"
        if self.cpu_flags is not None and self.machine in ("x86_64", "AMD64", "i686"):
            present = [flag for flag in (*X86_BF16_FLAGS, *X86_FP16_FLAGS) if flag in self.cpu_flags]
            cpu += f"; {' '.join(present)}" if present else "; no avx512_bf16 / amx_bf16"
        if self.kind == "cpu":
            return f"CPU {self.name} ({cpu})"
        if self.compute_capability is not None:
            major, minor = self.compute_capability
            return f"{self.kind.upper()} {self.name} (compute capability {major}.{minor}); host CPU {cpu}"
        return f"{self.kind.upper()} {self.name}; host CPU {cpu}"


def _cpu_flags() -> Optional[tuple[str, ...]]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    words = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):  # x86 / ARM
            words.update(line.partition(":")[2].split())
    return tuple(flag for flag in CPU_PRECISION_FLAGS if flag in words)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def describe_device(device: torch.device | str) -> DeviceFacts:
    """The :class:`DeviceFacts` of ``device`` (the CPU fields from this host)."""
    device = torch.device(device)
    facts = dict(
        kind=device.type,
        name=_cpu_name(),
        machine=platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=_cpu_flags(),
        onednn_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        onednn_fp16=bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
    )
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            facts.update(
                name=torch.cuda.get_device_name(index),
                compute_capability=tuple(torch.cuda.get_device_capability(index)),
                cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
            )
    return DeviceFacts(**facts)


def precision_problem(facts: DeviceFacts, mixed_precision: str) -> Optional[str]:
    """``None`` when ``mixed_precision`` runs natively on the device of ``facts``, else what it lacks, what
    running anyway costs and what to use instead."""
    if mixed_precision == "no":
        return None
    if facts.kind == "cpu":
        return _cpu_problem(facts, mixed_precision)
    if facts.kind == "cuda":
        return _cuda_problem(facts, mixed_precision)
    return None  # other accelerators: their support is not known here (recorded as unchecked)


def _cpu_problem(facts: DeviceFacts, mixed_precision: str) -> Optional[str]:
    x86 = facts.machine in ("x86_64", "AMD64", "i686")
    if mixed_precision == "bf16":
        if not facts.onednn_bf16:
            return (
                f"oneDNN has no bf16 kernels for this CPU (capability {facts.cpu_capability}"
                f"{', no AVX-512' if x86 else ''}), so bf16 convolutions fall back to reference kernels: measured "
                f"on an AVX2-only CPU, {CPU_BF16_SLOWDOWN}; use --mixed_precision no on this CPU"
            )
        if x86 and facts.cpu_flags is not None and not set(X86_BF16_FLAGS) & set(facts.cpu_flags):
            return (
                "this CPU has no bf16 arithmetic (neither avx512_bf16 nor amx_bf16): oneDNN converts bf16 to fp32 "
                "around every operation, which buys no speed (not measured here); use --mixed_precision no on "
                "this CPU"
            )
        return None
    flags_say_no = x86 and facts.cpu_flags is not None and not set(X86_FP16_FLAGS) & set(facts.cpu_flags)
    if facts.onednn_fp16 and not flags_say_no:
        return None
    return "this CPU has no fp16 arithmetic (neither avx512_fp16 nor amx_fp16); use --mixed_precision no on this CPU"


def _cuda_problem(facts: DeviceFacts, mixed_precision: str) -> Optional[str]:
    capability = facts.compute_capability or (0, 0)
    shown = f"{capability[0]}.{capability[1]}"
    if mixed_precision == "bf16":
        if capability >= BF16_MIN_COMPUTE_CAPABILITY or facts.cuda_bf16:
            return None
        instead = (
            "use --mixed_precision fp16 (with loss scaling, on its fp16 tensor cores)"
            if capability >= FP16_MIN_COMPUTE_CAPABILITY
            else "use --mixed_precision no"
        )
        return (
            f"compute capability {shown} has no bf16 tensor cores (they need 8.0, Ampere or newer): bf16 runs "
            f"emulated, slower than the fp16 it could use (not measured here); {instead}"
        )
    if capability >= FP16_MIN_COMPUTE_CAPABILITY:
        return None
    return (
        f"compute capability {shown} has no fp16 tensor cores (they need 7.0, Volta or newer), so fp16 buys no "
        "speed (not measured here); use --mixed_precision no"
    )


@dataclass(frozen=True)
class PrecisionDecision:
    """The verdict on ``mixed_precision`` over the devices of all processes (``devices[rank]``).

    ``problems`` maps a process to what its device lacks; ``autocast_problem`` says when the library would not
    run the precision at all (Accelerate does not autocast fp16 on a CPU).
    """

    mixed_precision: str
    devices: tuple[DeviceFacts, ...]
    allow_emulated: bool = False
    autocast_problem: Optional[str] = None

    @property
    def problems(self) -> dict[int, str]:
        found = {rank: precision_problem(facts, self.mixed_precision) for rank, facts in enumerate(self.devices)}
        return {rank: problem for rank, problem in found.items() if problem is not None}

    @property
    def native(self) -> bool:
        return not self.problems and self.autocast_problem is None

    def _device_groups(self) -> list[tuple[list[int], DeviceFacts]]:
        groups: dict[DeviceFacts, list[int]] = {}
        for rank, facts in enumerate(self.devices):
            groups.setdefault(facts, []).append(rank)
        return [(ranks, facts) for facts, ranks in groups.items()]

    def describe(self) -> list[str]:
        """The ``--dry_run`` lines: the verdict, then each distinct device and the facts it rests on."""
        if self.native:
            verdict = f"mixed precision {self.mixed_precision}: native on every device"
        elif self.autocast_problem is not None:
            verdict = f"mixed precision {self.mixed_precision}: refused: {self.autocast_problem}"
        elif self.allow_emulated:
            verdict = f"mixed precision {self.mixed_precision}: NOT native, run anyway ({OVERRIDE_OPTION})"
        else:
            verdict = f"mixed precision {self.mixed_precision}: NOT native, a launch is refused"
        lines = [verdict]
        problems = self.problems
        for ranks, facts in self._device_groups():
            support = {name: precision_problem(facts, name) is None for name in ("bf16", "fp16")}
            native = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in support.items())
            facts_line = (
                f"oneDNN bf16 {_yes_no(facts.onednn_bf16)}, fp16 {_yes_no(facts.onednn_fp16)}"
                if facts.kind == "cpu"
                else f"torch.cuda.is_bf16_supported(including_emulation=False) {_yes_no(facts.cuda_bf16)}"
            )
            lines.append(f"  process {_ranks(ranks)}: {facts.summary()}; {facts_line}; native {native}")
            if ranks[0] in problems:
                lines.append(f"    {problems[ranks[0]]}")
        return lines

    def check(self) -> None:
        """Raise :class:`PrecisionError` unless the precision is native everywhere (or emulation is allowed)."""
        if self.autocast_problem is not None:
            raise PrecisionError(f"--mixed_precision {self.mixed_precision}: {self.autocast_problem}")
        problems = self.problems
        if not problems or self.allow_emulated:
            return
        details = "; ".join(
            f"process {_ranks(ranks)} ({facts.summary()}): {problems[ranks[0]]}"
            for ranks, facts in self._device_groups()
            if ranks[0] in problems
        )
        raise PrecisionError(
            f"--mixed_precision {self.mixed_precision} does not run natively here: {details}. "
            f"Pass {OVERRIDE_OPTION} to run it anyway."
        )

    def to_json(self) -> dict:
        """The record in ``results.json`` (``precision``): the verdict and each distinct device with its ranks."""
        problems = self.problems
        return {
            "mixed_precision": self.mixed_precision,
            "native": self.native,
            "allow_emulated": self.allow_emulated,
            "devices": [
                {
                    "processes": ranks,
                    **facts.to_json(),
                    "native": {name: precision_problem(facts, name) is None for name in ("bf16", "fp16")},
                    "problem": problems.get(ranks[0]),
                }
                for ranks, facts in self._device_groups()
            ],
        }


def _yes_no(value: Optional[bool]) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def _ranks(ranks: Sequence[int]) -> str:
    if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def decide_precision(
    mixed_precision: str,
    devices: Sequence[DeviceFacts],
    allow_emulated: bool = False,
    autocasts: bool = True,
) -> PrecisionDecision:
    """The :class:`PrecisionDecision` for ``devices`` (one per process). ``autocasts`` is False when the
    accelerator would not autocast the requested precision at all (Accelerate's fp16 on a CPU)."""
    autocast_problem = None
    if mixed_precision != "no" and not autocasts:
        kinds = sorted({facts.kind for facts in devices})
        autocast_problem = (
            f"Accelerate runs no {mixed_precision} autocast on {'/'.join(kinds)}: the run would train in fp32 while "
            f"recording {mixed_precision}; use --mixed_precision no (or bf16 on a CPU with avx512_bf16 / amx_bf16)"
        )
    return PrecisionDecision(mixed_precision, tuple(devices), allow_emulated, autocast_problem)


def gather_precision_decision(accelerator, allow_emulated: bool = False) -> PrecisionDecision:
    """Every process describes its own device; the facts are gathered so all processes decide alike."""
    facts = describe_device(accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        devices = [DeviceFacts.from_json(values) for values in gather_object([facts.to_json()])]
    else:
        devices = [facts]
    return decide_precision(
        accelerator.mixed_precision,
        devices,
        allow_emulated,
        autocasts=accelerator.mixed_precision == "no" or accelerator.native_amp,
    )
