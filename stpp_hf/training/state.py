"""Run state and artefact checksums: a ``kill -9`` at any moment corrupts nothing.

Every file and directory of a run is written through :mod:`stpp_hf.file_io` (a temporary name renamed into
place; directories swapped in with two renames that a relaunch finishes if a kill interrupted them). ``state.json``
records the finished stages with the SHA-256 of their artefacts and the fingerprints of their inputs, so a
relaunch skips exactly the stages whose outputs are intact and whose inputs are unchanged.
:func:`lock_run_directory` keeps a second launch out of a run directory in use (so the fixed temporary names of
:func:`~stpp_hf.file_io.temporary_path_for` are safe: only one launch at a time writes there).
"""

import atexit
import fcntl
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from huggingface_hub.dataclasses import strict

from ..file_io import sha256_file
from ..log import get_logger
from ..records import JsonRecord
from .run_layout import RunLayout

logger = get_logger(__name__)

STATE_VERSION = 1
# run directory -> open flock-ed descriptor (or the created lock file), held for the process lifetime
_held_locks: dict[Path, int | Path] = {}


class RunDirectoryLocked(RuntimeError):
    """Another launch holds the run directory."""


def lock_run_directory(run_dir: str | os.PathLike) -> None:
    """Take the exclusive lock of ``run_dir`` for the rest of this process's life (again: no-op).

    ``run_dir/run.lock`` is ``flock``-ed (released by the kernel when the process ends, even on
    ``kill -9``) and holds the holder's pid, host and start time, which the refusal names. On a file system
    without ``flock`` (Lustre mounted without ``-o flock``, NFS with ``nolock``) the lock is instead the file
    ``run.lock.held``, created exclusively with the same line and removed when the process exits; a killed launch
    leaves it behind, and the refusal then says so when it can tell (a pid that no longer runs on this host).

    Raises:
        RunDirectoryLocked: another process holds the lock.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunLayout(run_dir).lock
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 4096, 0).decode("utf-8", errors="replace").strip() or "unknown process"
        os.close(descriptor)
        raise RunDirectoryLocked(
            f"{run_dir} is in use by another launch ({holder}, see {path}); wait for it to end or stop it, "
            "or use another --output_dir"
        ) from None
    except OSError as error:  # ENOLCK, ENOSYS, EOPNOTSUPP: this file system has no flock
        os.close(descriptor)
        _held_locks[run_dir] = _create_lock_file(run_dir, error)
        return
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, _holder_line(), 0)
    _held_locks[run_dir] = descriptor


def _holder_line() -> bytes:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode("utf-8")


def _create_lock_file(run_dir: Path, flock_error: OSError) -> Path:
    """Take the lock of ``run_dir`` as the exclusively created ``run.lock.held``; removed at exit."""
    path = RunLayout(run_dir).lock_file
    holder = _holder_line()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        text = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown process"
        match = re.match(r"pid (\d+) on host (\S+),", text)
        stale = match is not None and match[2] == socket.gethostname() and not _process_exists(int(match[1]))
        state = (
            f"pid {match[1]} no longer runs on this host, so the file is stale"
            if stale
            else "if that process no longer runs (a killed launch leaves the file behind), the file is stale"
        )
        raise RunDirectoryLocked(
            f"{run_dir} is in use by another launch ({text}, see {path}; this file system has no flock: "
            f"{flock_error.strerror}); {state}: delete {path} and relaunch; otherwise wait "
            "for that launch to end or stop it, or use another --output_dir"
        ) from None
    try:
        os.write(descriptor, holder)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    atexit.register(_remove_lock_file, path, holder)
    logger.warning("%s: no flock on this file system (%s): locked by creating %s", run_dir, flock_error.strerror, path)
    return path


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_lock_file(path: Path, holder: bytes) -> None:
    try:
        if path.read_bytes() == holder:  # still ours
            path.unlink()
    except FileNotFoundError:
        pass


def artefact_checksums(run_dir: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{path relative to run_dir: sha256}`` of files, or of every file under directories."""
    run_dir = Path(run_dir)
    checksums = {}
    for path in paths:
        path = Path(path)
        path = path if path.is_absolute() else run_dir / path
        if not path.exists():
            raise FileNotFoundError(f"artefact {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            checksums[file.relative_to(run_dir).as_posix()] = sha256_file(file)
    return checksums


@strict
@dataclass(kw_only=True)
class StageRecord(JsonRecord):
    """A finished stage in ``state.json``: ``{relpath: sha256}`` of its artefacts, ``{name: fingerprint}`` of its
    inputs (absent in the oldest files: none recorded), and its summary."""

    RECORD_NAME = "stage record"

    artefacts: dict[str, str] = field(metadata={"expected": "an object of {path: SHA-256 string}"})
    inputs: dict = field(default_factory=dict)
    summary: dict


@strict
@dataclass(kw_only=True)
class StateFile(JsonRecord):
    """The whole ``state.json``; the stage records are read one by one (:meth:`RunState.reload` drops those that
    are redone before reading them)."""

    RECORD_NAME = "state"
    # an earlier version kept a copy of the run's settings here; they are run_config.json's alone (compared there)
    DROPPED_FIELDS = frozenset({"run_config"})

    version: int
    stages: dict = field(default_factory=dict)


@strict
@dataclass(kw_only=True)
class EpochInProgress(JsonRecord):
    """Where a step checkpoint cut its epoch: the optimizer steps done in it, those since the last loss read-back,
    each process's loss sum since then (in rank order) and the epoch's loss sum so far."""

    RECORD_NAME = "epoch_in_progress"

    epoch_step: int
    interval_steps: int
    loss_sums: list[float | int]
    epoch_loss_sum: float | int


@strict
@dataclass(kw_only=True)
class TrainerState(JsonRecord):
    """A stage checkpoint's ``trainer_state.json``: the finished epochs, the best val mIoU so far (``-1.0`` before
    the first), its epoch and metrics, the history, the inputs the stage was trained for, and for a step checkpoint
    its ``epoch_in_progress``."""

    RECORD_NAME = "trainer_state"

    epoch: int
    best_miou: float | int
    best_epoch: int
    history: list
    best_metrics: dict
    inputs: dict = field(default_factory=dict)  # absent in the oldest files
    epoch_in_progress: EpochInProgress | None = None


class RunState:
    """The ``state.json`` of a run directory.

    Layout: ``{"version", "stages": {name: {"artefacts": {relpath: sha256}, "inputs": {name: fingerprint},
    "summary": {...}}}}`` (:class:`StateFile`, :class:`StageRecord`). The run's settings are not here: they are
    ``run_config.json``'s, which a relaunch with other settings is refused by before this file is read.
    ``inputs`` fingerprints what a stage read (teacher weights, upstream labels, id lists): a stage whose
    inputs changed since it finished is redone. ``redo`` names stages whose records are dropped on
    loading (a damaged record included), so they and, through their inputs, the stages after them are redone.
    """

    def __init__(self, run_dir: str | os.PathLike, redo: Iterable[str] = ()):
        self.run_dir = Path(run_dir)
        self.path = RunLayout(self.run_dir).state
        self.redo = set(redo)
        self.reload()
        self.redo = set()  # dropped once: later reloads read the records these stages get when redone

    def reload(self) -> None:
        """Read ``state.json`` again (other processes call this after the main process wrote it)."""
        self.stages: dict[str, StageRecord] = {}
        if not self.path.exists():
            return
        saved = StateFile.read(self.path, self._restart_advice())
        if saved.version != STATE_VERSION:
            raise ValueError(f"{self.path} has version {saved.version}, expected {STATE_VERSION}")
        for name, record in saved.stages.items():
            if name in self.redo:
                continue
            try:
                self.stages[name] = StageRecord.from_json(record, self.path, f"stages[{name!r}]")
            except ValueError as error:
                raise ValueError(
                    f"{error}: the record of stage {name!r} is malformed; redo that stage and the ones after it "
                    f"with --redo_stage {name}, or {self._restart_advice()}"
                ) from None

    def _restart_advice(self) -> str:
        return (
            f"move it away to redo every stage of {self.run_dir} (the stage directories stay, and training stages "
            "continue from their epoch checkpoints where they have one)"
        )

    def is_done(self, name: str, inputs: Mapping[str, str] | None = None) -> bool:
        """True when ``name`` finished, all its artefacts still match their checksums, and (when given)
        its ``inputs`` fingerprints are the ones it finished with."""
        record = self.stages.get(name)
        if record is None:
            return False
        if inputs is not None and record.inputs != dict(inputs):
            recorded = record.inputs
            changed = sorted(key for key in set(recorded) | set(inputs) if recorded.get(key) != inputs.get(key))
            logger.warning("inputs of finished stage %r changed (%s): redoing the stage", name, ", ".join(changed))
            return False
        for relative, expected in record.artefacts.items():
            file = self.run_dir / relative
            if not file.is_file() or sha256_file(file) != expected:
                logger.warning("artefact %s of finished stage %r is missing or changed: redoing the stage", file, name)
                return False
        return True

    def summary(self, name: str) -> dict:
        return self.stages[name].summary

    def mark_done(
        self,
        name: str,
        artefacts: Iterable[str | os.PathLike],
        summary: Mapping[str, Any],
        inputs: Mapping[str, str] | None = None,
    ) -> None:
        """Record ``name`` as finished with checksums of ``artefacts`` and the fingerprints of its
        ``inputs`` (call on the main process)."""
        self.stages[name] = StageRecord(
            artefacts=artefact_checksums(self.run_dir, artefacts), inputs=dict(inputs or {}), summary=dict(summary)
        )
        self.save()

    def save(self) -> None:
        StateFile(version=STATE_VERSION, stages=self.stages).write(self.path)
