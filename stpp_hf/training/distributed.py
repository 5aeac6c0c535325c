"""What a run needs from the processes it spans: their rank, a reachable main process, a shared run directory.

On several machines every process writes into the run directory (its shard of the pseudo labels, its RNG
state) and reads what the main process wrote (``state.json``, the stage models, the ``datasets`` caches), so
the directory must be one filesystem that all nodes share. :func:`check_shared_run_dir` proves it before a
run writes anything; :func:`create_accelerator` turns a failed rendezvous into an error that says where the
process tried to connect.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import torch.distributed
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ..file_io import atomic_write_text, json_text

# The pipeline already relies on a file closed before a barrier being visible to every process right after
# it; the wait only absorbs a slow attribute cache, so a few seconds are generous.
SHARED_DIR_TIMEOUT_S = 10.0


class RunDirNotSharedError(RuntimeError):
    """The processes of a run do not see one another's files in the run directory."""


class RendezvousError(RuntimeError):
    """A process could not join the others at ``MASTER_ADDR:MASTER_PORT``."""


def rank_and_world_size(accelerator=None) -> tuple[int, int]:
    """``(process index, number of processes)``; ``(0, 1)`` without an accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def create_accelerator(**accelerator_kwargs) -> Accelerator:
    """``Accelerator(**accelerator_kwargs)``, with a failed rendezvous reported as one :class:`RendezvousError`.

    A process started with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` (``srun``, ``mpirun``, a
    hand-made launch) connects to the main process's TCP store while the Accelerator is created; it waits for
    the process-group timeout (``InitProcessGroupKwargs(timeout=...)``, 30 min for gloo, 10 min for NCCL by
    default; the same timeout then bounds every collective). Under ``accelerate launch`` on several machines
    torchrun's agent connects before the script starts; its wait is ``--rdzv_conf timeout=<s>`` (600 s).
    """
    try:
        return Accelerator(**accelerator_kwargs)
    except (torch.distributed.DistNetworkError, torch.distributed.DistStoreError) as error:
        address = ":".join(os.environ.get(name, f"<{name} unset>") for name in ("MASTER_ADDR", "MASTER_PORT"))
        rank, world_size = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
        if rank == "0":
            problem = (
                f"process 0 of {world_size} on {socket.gethostname()} hosts the rendezvous at {address} and not all "
                "other processes joined it in time"
            )
        else:
            problem = (
                f"process {rank} of {world_size} on {socket.gethostname()} could not reach the main process at "
                f"{address} in time"
            )
        cause = f"{error.__class__.__name__}: {str(error).splitlines()[0].rstrip('.')}"
        raise RendezvousError(
            f"{problem} ({cause}). Check that the main node (machine rank 0) was started, that this address is "
            "the main node's as seen from every node (not 127.0.0.1 unless all processes run on one machine), that "
            "no firewall blocks the port, and that every node was given the same address, port and number of "
            "processes (--main_process_ip, --main_process_port, --num_processes, --num_machines)."
        ) from None


def check_shared_run_dir(accelerator, run_dir: str | os.PathLike, timeout_s: float = SHARED_DIR_TIMEOUT_S) -> None:
    """Raise :class:`RunDirNotSharedError` on every process unless all processes share ``run_dir``.

    Every process writes a marker named after a token drawn for this launch by the main process (so markers
    left by an earlier launch never count); the main process waits up to ``timeout_s`` to see all markers, the
    others to see the main process's. The verdict is gathered, so all processes raise the same error (or none)
    and none is left waiting in a collective. The markers are removed again; on failure a run directory that
    this check created is removed too when it is empty, so a refused launch leaves nothing behind.
    """
    rank, world_size = rank_and_world_size(accelerator)
    if world_size == 1:
        return
    run_dir = Path(run_dir).absolute()
    token = broadcast_object_list([uuid.uuid4().hex if rank == 0 else None])[0]

    def marker(process: int) -> Path:
        return run_dir / f".shared-dir-check-{token}-{process}"

    report = {"rank": rank, "host": socket.gethostname(), "run_dir": str(run_dir), "error": None, "unseen": []}
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker(rank), json_text({"rank": rank, "host": report["host"], "pid": os.getpid()}))
    except OSError as error:
        report["error"] = f"{error.__class__.__name__}: {error}"
    accelerator.wait_for_everyone()  # every marker is written (or failed) before anyone looks
    if report["error"] is None:
        expected = range(world_size) if rank == 0 else [0]
        report["unseen"] = _wait_until_visible({process: marker(process) for process in expected}, timeout_s)
    reports = gather_object([report])  # also keeps each marker in place until every process has looked
    marker(rank).unlink(missing_ok=True)
    failed = [r for r in reports if r["error"] is not None or r["unseen"]]
    if not failed:
        return
    if created:
        try:
            run_dir.rmdir()
        except OSError:  # not empty: another process's marker, or the main process's on a shared directory
            pass
    raise RunDirNotSharedError(_not_shared_message(reports, timeout_s))


def _wait_until_visible(markers: dict[int, Path], timeout_s: float) -> list[int]:
    """The processes whose marker file is still not visible after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        unseen = [process for process, path in markers.items() if not path.is_file()]
        if not unseen or time.monotonic() >= deadline:
            return unseen
        time.sleep(0.1)


def _not_shared_message(reports: list[dict], timeout_s: float) -> str:
    by_rank = {r["rank"]: r for r in reports}

    def describe(rank: int) -> str:
        return f"process {rank} (host {by_rank[rank]['host']}, run directory {by_rank[rank]['run_dir']})"

    problems = []
    for r in reports:
        if r["error"] is not None:
            problems.append(f"{describe(r['rank'])} could not write its marker ({r['error']})")
        elif r["unseen"]:
            others = ", ".join(describe(rank) for rank in r["unseen"])
            problems.append(f"{describe(r['rank'])} did not see the marker of {others} within {timeout_s:g} s")
    return (
        "The run directory must be on a filesystem that all nodes share (NFS, Lustre, a cluster file system), at "
        "the same path on every node: each process wrote a marker file into it, and "
        + "; ".join(problems)
        + ". Nothing was written to the run. Give every node the same --output_dir on a shared filesystem "
        "(the dataset root may be a per-node copy)."
    )
