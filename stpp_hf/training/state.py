"""Run state, atomic artefacts and checksums: a ``kill -9`` at any moment corrupts nothing.

Every file is written to a temporary name and renamed into place; directories (a ``save_pretrained``
model, an ``accelerator.save_state`` checkpoint) are built under a temporary name and swapped in with
two renames, and :func:`recover_directory` finishes a swap that a kill interrupted. ``state.json``
records the finished stages with the SHA-256 of their artefacts, so a relaunch skips exactly the
stages whose outputs are intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import check_same_config

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + ``os.replace`` (fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def temporary_path_for(path: str | os.PathLike) -> Path:
    """The sibling ``.<name>.tmp`` where ``path``'s new content is built (fixed name, so all
    processes of a run agree on it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def temporary_directory_for(path: str | os.PathLike) -> Path:
    """A fresh, empty :func:`temporary_path_for` directory."""
    temporary = temporary_path_for(path)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def recover_directory(path: str | os.PathLike) -> None:
    """Finish a :func:`replace_directory` that a kill interrupted between its two renames."""
    path = Path(path)
    old = _old_name(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)


def replace_directory(temporary: str | os.PathLike, path: str | os.PathLike) -> None:
    """Swap the finished directory ``temporary`` into ``path`` (old content moved aside first)."""
    path = Path(path)
    recover_directory(path)
    old = _old_name(path)
    if path.exists():
        os.replace(path, old)
    os.replace(temporary, path)
    if old.exists():
        shutil.rmtree(old)


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


class RunState:
    """The ``state.json`` of a run directory.

    Layout: ``{"version", "run_config": {...}, "stages": {name: {"artefacts": {relpath: sha256},
    "summary": {...}}}}``. ``run_config`` holds the settings that change results; relaunching in the
    same directory with different ones is refused instead of mixing two runs.
    """

    def __init__(self, run_dir: str | os.PathLike, run_config: Mapping[str, Any]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_FILE
        self.run_config = json.loads(json.dumps(dict(run_config)))  # normalise tuples etc. like on disk
        self.reload()

    def reload(self) -> None:
        """Read ``state.json`` again (other processes call this after the main process wrote it)."""
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path} is not valid JSON ({error}); remove it to restart the run") from error
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"{self.path} has version {data.get('version')}, expected {STATE_VERSION}")
            check_same_config(self.run_dir, data.get("run_config", {}), self.run_config)
            self.stages: dict[str, dict] = data.get("stages", {})
        else:
            self.stages = {}

    def is_done(self, name: str) -> bool:
        """True when ``name`` finished and all its artefacts still match their checksums."""
        record = self.stages.get(name)
        if record is None:
            return False
        for relative, expected in record["artefacts"].items():
            file = self.run_dir / relative
            if not file.is_file() or sha256_file(file) != expected:
                logger.warning("artefact %s of finished stage %r is missing or changed: redoing the stage", file, name)
                return False
        return True

    def summary(self, name: str) -> dict:
        return self.stages[name]["summary"]

    def mark_done(self, name: str, artefacts: Iterable[str | os.PathLike], summary: Mapping[str, Any]) -> None:
        """Record ``name`` as finished with checksums of ``artefacts`` (call on the main process)."""
        self.stages[name] = {"artefacts": artefact_checksums(self.run_dir, artefacts), "summary": dict(summary)}
        self.save()

    def save(self) -> None:
        atomic_write_json(
            self.path, {"version": STATE_VERSION, "run_config": self.run_config, "stages": self.stages}
        )
