"""Non-finite values: a diverged training stops with an error instead of saving or reporting NaN weights.

The trainer checks the loss where it already reads it back (every ``logging_steps`` and at the end of an epoch)
and the weights before each save; the selection stage and the Hub upload check the models they read, so a run
directory written before these checks cannot pass NaN on either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


class NonFiniteError(RuntimeError):
    """A loss or weights that are NaN or infinite; the message names where and what to try."""


# what to try when a stage diverges; the run directory's settings are fixed, so the advice needs a new one
DIVERGENCE_ADVICE = (
    "try a lower --lr, --mixed_precision no (fp32) if it ran in fp16 / bf16, or a larger --global_batch_size, "
    "in a new --output_dir"
)


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in ``tensors`` holding a NaN or an infinity (one host sync)."""
    names = [name for name, tensor in tensors.items() if tensor.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def describe_nonfinite(names: list[str], total: int) -> str:
    """``"3 of 176 tensors (e.g. a, b, c)"``."""
    return f"{len(names)} of {total} tensors (e.g. {', '.join(names[:3])})"


def check_finite_model(model: torch.nn.Module, where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` when a parameter or buffer of ``model`` is not finite."""
    state = model.state_dict()
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(f"{where} holds non-finite weights in {describe_nonfinite(bad, len(state))}")


def check_finite_model_dir(model_dir: str | os.PathLike) -> None:
    """Raise :class:`NonFiniteError` when a ``*.safetensors`` file of the ``save_pretrained`` directory
    ``model_dir`` holds a NaN or an infinity (a run that diverged before the trainer checked)."""
    from safetensors.torch import load_file

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors = load_file(path)
        bad = nonfinite_tensors(tensors)
        if bad:
            raise NonFiniteError(
                f"{path} holds non-finite weights in {describe_nonfinite(bad, len(tensors))}: the run diverged; "
                f"{DIVERGENCE_ADVICE}"
            )
