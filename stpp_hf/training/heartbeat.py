"""A process of a run that stops answering ends every process within a stated time, naming it.

A collective waits for every process up to the process-group timeout, however long ago the one it waits for
stopped (SIGSTOP, a swapped-out or frozen node). So each process also beats: a thread rewrites the process's
beat file in the run directory (shared by every node) every ``timeout_s / 10`` seconds and reads the others'.
A process whose file has not changed for ``timeout_s`` seconds, by the reader's own clock (the nodes' clocks
need not agree), is reported on stderr by rank, host and pid, and the reader exits with
:data:`PREEMPTED_EXIT_CODE`; the launcher then ends the rest (torchrun sends SIGTERM, and SIGKILL after
30 s to a process that does not end, a stopped one included). A process whose main thread is stuck in a
system call (a hung NFS read) still beats: the process-group timeout ends that case.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from accelerate.utils import broadcast_object_list

from ..file_io import atomic_write_text
from .preemption import PREEMPTED_EXIT_CODE  # a run ended for a stopped process resumes when relaunched

BEATS_PER_TIMEOUT = 10
# how long torchrun waits after SIGTERM before it sends SIGKILL to the processes that are left
LAUNCHER_GRACE_S = 30


class Heartbeat:
    """Beats for process ``rank`` of ``world_size`` into ``directory`` and watches the other processes' beats.

    ``on_stopped(message)`` is called (in the watching thread) when another process has not beaten for
    ``timeout_s``; by default it prints the message and ends this process with :data:`PREEMPTED_EXIT_CODE`.
    """

    def __init__(self, directory, rank, world_size, token, timeout_s, on_stopped=None):
        self.directory, self.rank, self.world_size = Path(directory), rank, world_size
        self.token, self.timeout_s = token, timeout_s
        self.on_stopped = on_stopped or _exit_naming
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._beats = 0
        self._thread = threading.Thread(target=self._run, name="stpp-heartbeat", daemon=True)

    def path(self, rank: int) -> Path:
        return self.directory / f"{self.token}-{rank}.json"

    def start(self) -> "Heartbeat":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._beat()  # before any process looks: every file exists once all have started
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.path(self.rank).unlink(missing_ok=True)

    def _beat(self) -> None:
        self._beats += 1
        record = {"rank": self.rank, "host": self.host, "pid": self.pid, "beat": self._beats}
        atomic_write_text(self.path(self.rank), json.dumps(record))

    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads(self.path(rank).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet, or being replaced
            return None

    def _run(self) -> None:
        interval = self.timeout_s / BEATS_PER_TIMEOUT
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        last_seen = {rank: (None, time.monotonic()) for rank in others}  # (record, when it last changed)
        while not self._stop.wait(interval):
            self._beat()
            now = time.monotonic()
            for rank in others:
                record = self._read(rank)
                if record is not None and record != last_seen[rank][0]:
                    last_seen[rank] = (record, now)
                elif now - last_seen[rank][1] > self.timeout_s:
                    self.on_stopped(self._stopped_message(rank, last_seen[rank][0], now - last_seen[rank][1]))
                    return

    def _stopped_message(self, rank: int, record: dict | None, silent_s: float) -> str:
        where = f" (host {record['host']}, pid {record['pid']})" if record else " (it never beat)"
        return (
            f"stpp-train: process {rank} of {self.world_size}{where} has not answered for {silent_s:.0f} s "
            f"(--heartbeat_timeout_s {self.timeout_s:g}): it is stopped, frozen or its node is gone. Process "
            f"{self.rank} on {self.host} ends now; the launcher ends the others within {LAUNCHER_GRACE_S} s. "
            "Relaunch the same command to resume from the last checkpoint."
        )


def _exit_naming(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(PREEMPTED_EXIT_CODE)  # the main thread may be blocked in a collective: end the whole process


def start_heartbeat(accelerator, directory, timeout_s: float) -> Heartbeat | None:
    """Start this process's :class:`Heartbeat` under ``directory`` for a launch of several processes (``None``
    for one process). Beat files of earlier launches are removed first; the token of this launch is drawn by
    the main process."""
    if accelerator.num_processes == 1:
        return None
    directory = Path(directory)
    if accelerator.is_main_process and directory.is_dir():
        for stale in directory.glob("*.json"):
            stale.unlink(missing_ok=True)
    token = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]
    heartbeat = Heartbeat(directory, accelerator.process_index, accelerator.num_processes, token, timeout_s)
    return heartbeat.start()
