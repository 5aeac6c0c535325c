"""Stopping cleanly when a cluster preempts the job, and not outliving the launcher (docs/preemption.md).

SIGTERM, SIGINT and SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``) only set a flag while a training stage runs:
the stage reads it once per optimizer step (all processes agree through one small all-reduce, so every process
stops after the same step), saves a step checkpoint through its usual atomic path and raises :class:`Preempted`.
Outside training (data preparation, selection, labeling, the final evaluation) the signal raises
:class:`Preempted` at once: that work is resumable after a kill at any point. ``stpp-train`` then prints one
line and exits with :data:`PREEMPTED_EXIT_CODE`, which a requeue script tests. A second Ctrl-C stops at once.

:func:`exit_with_launcher` makes a process started by a launcher (``accelerate launch`` / torchrun) receive
SIGTERM when that launcher dies, so killing the launcher never leaves orphaned workers training on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

import torch
import torch.distributed

# EX_TEMPFAIL of sysexits.h ("temporary failure, the user is invited to retry"): stopped by a signal after
# saving what a relaunch of the same command resumes from
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Preempted(BaseException):
    """The run was stopped by a signal after saving what it needs to resume. A ``BaseException`` like
    ``KeyboardInterrupt``: no ``except Exception`` on the way out may take it for a failure of its own."""


class _StopRequest:
    """The signal received (0: none) and how deep the code runs inside :func:`stop_at_step_boundaries`."""

    signal_number = 0
    deferring = 0
    cpu_group = None  # the gloo group of the all-reduce when the default process group is not gloo


def _on_stop_signal(signal_number: int, frame) -> None:
    if _StopRequest.signal_number and signal_number == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
    _StopRequest.signal_number = _StopRequest.signal_number or signal_number
    if not _StopRequest.deferring:
        raise Preempted(f"stopped by {signal_name(signal_number)}")


@contextlib.contextmanager
def stop_handlers():
    """Inside, :data:`STOP_SIGNALS` are handled as the module docstring says (enter from the main thread of the
    entry point); the handlers before are put back on leaving, so a caller in the same process is not left with
    them."""
    before = {stop_signal: signal.signal(stop_signal, _on_stop_signal) for stop_signal in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop_signal, handler in before.items():
            signal.signal(stop_signal, handler)


def signal_name(signal_number: int) -> str:
    return signal.Signals(signal_number).name


@contextlib.contextmanager
def stop_at_step_boundaries():
    """Inside, a stop signal only sets the flag that :func:`agreed_stop_signal` reads; a signal still pending when
    the block ends raises :class:`Preempted` there."""
    _StopRequest.deferring += 1
    try:
        yield
    finally:
        _StopRequest.deferring -= 1
    if _StopRequest.signal_number and not _StopRequest.deferring:
        raise Preempted(f"stopped by {signal_name(_StopRequest.signal_number)}")


def agreed_stop_signal(num_processes: int) -> int:
    """The stop signal any process received (0: none), the same on every process: a collective, so every
    process calls it at the same points (the optimizer-step boundaries)."""
    if num_processes == 1:
        return _StopRequest.signal_number
    # on the CPU through gloo: no device sync per step, whatever the backend of the training
    flag = torch.tensor([_StopRequest.signal_number], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=_cpu_group())
    return int(flag.item())


def _cpu_group():
    if torch.distributed.get_backend() == "gloo":
        return None  # the default group
    if _StopRequest.cpu_group is None:
        _StopRequest.cpu_group = torch.distributed.new_group(backend="gloo")
    return _StopRequest.cpu_group


def exit_with_launcher() -> None:
    """Under a launcher (torchrun / ``accelerate launch``), ask Linux to send this process SIGTERM when the launcher
    dies, so it checkpoints and exits like a preempted one instead of training on as an orphan (no-op elsewhere)."""
    launched = any(name in os.environ for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"))
    if not launched or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not available (a sandbox): the process keeps the default behaviour
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
