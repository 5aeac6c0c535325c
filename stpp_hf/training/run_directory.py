"""Opening a run directory for a launch, once: every process sees the same directory, one launch at a time holds
it, the processes watch each other's heartbeats, and the settings are those of the run it holds."""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import broadcast_object_list

from .distributed import check_shared_run_dir
from .heartbeat import Heartbeat, start_heartbeat
from .run_layout import RunLayout
from .run_record import check_and_record_run_config
from .state import RunDirectoryLocked, lock_run_directory


def lock_run(accelerator, run_dir: str | Path) -> None:
    """Lock ``run_dir`` for this launch (:func:`~stpp_hf.training.state.lock_run_directory`): the main
    process takes the lock, every process raises :class:`RunDirectoryLocked` if it was refused."""
    verdict = [None]
    if accelerator.is_main_process:
        try:
            lock_run_directory(run_dir)
        except RunDirectoryLocked as error:
            verdict = [str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict, from_process=0)
    if verdict[0] is not None:
        raise RunDirectoryLocked(verdict[0])


def claim_run_directory(accelerator, run_dir: str | Path) -> None:
    """Before anything is read from or written to ``run_dir``: all processes see it, and this launch holds it."""
    check_shared_run_dir(accelerator, run_dir)
    lock_run(accelerator, run_dir)


def check_run_record(accelerator, run_dir: Path, record: dict, check=check_and_record_run_config, write=True) -> None:
    """Every process compares ``record`` with the saved one (``check``); then (``write``) the main process records
    it."""
    check(run_dir, record, write=False)
    accelerator.wait_for_everyone()
    if write and accelerator.is_main_process:
        check(run_dir, record, write=True)
    accelerator.wait_for_everyone()


def open_run_directory(accelerator, run_dir: Path, record: dict, heartbeat_timeout_s: float) -> Heartbeat | None:
    """Claim ``run_dir`` (:func:`claim_run_directory`), start the heartbeat (from here a process that stops
    answering ends the run; one that raises stops beating too) and compare the settings ``record`` with the saved
    one. A new run directory records them now; a relaunch records them once the data matches too."""
    claim_run_directory(accelerator, run_dir)
    heartbeat = start_heartbeat(accelerator, RunLayout(run_dir).heartbeats, heartbeat_timeout_s)
    check_run_record(accelerator, run_dir, record, write=not RunLayout(run_dir).run_config.is_file())
    return heartbeat
