"""Atomic file writes, strict JSON and SHA-256 fingerprints, used by every artefact of a run (state, split files,
pseudo labels, caches, pictures): a ``kill -9`` at any moment leaves either the old file or the new one, never a
torn one; files get the permissions the umask gives (not ``mkstemp``'s owner-only ones); JSON is written and read
strictly (no ``NaN`` / ``Infinity``, which strict parsers refuse); a file's checksum is computed one way everywhere."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .disk_full import disk_full_errors


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only set it, and
    setting it back and forth would race with threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(directory: str | os.PathLike) -> None:
    """Give every file under ``directory`` the permissions an ordinary ``open`` would (``0o666`` less the umask):
    some writers (safetensors) create owner-only files whatever the umask."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file():
            path.chmod(mode)


def temporary_sibling(path: str | os.PathLike) -> tuple[int, str]:
    """Create the hidden temporary file ``.<name>.<random>.tmp`` next to ``path``.

    Args:
        path: the file the temporary one will replace; its directory must exist.

    Returns:
        ``(descriptor, temporary path)``, as ``tempfile.mkstemp``; the file has the permissions an ordinary
        ``open`` would give it (``0o666`` less the umask), so group members of a shared run directory can read
        what replaces ``path``.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask
    return handle, temporary


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to a temporary file next to ``path``, fsync it, then rename it over ``path``.

    Args:
        path: the destination; missing parent directories are created.
        payload: the file's new content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = temporary_sibling(path)
    try:
        with disk_full_errors(path, len(payload), temporary), os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _first_nonfinite(payload: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinite float in ``payload`` (``None`` without one)."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return where or "the value"
    items = (
        payload.items()
        if isinstance(payload, dict)
        else enumerate(payload)
        if isinstance(payload, (list, tuple))
        else ()
    )
    for key, value in items:
        found = _first_nonfinite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def json_text(payload: Any, what: str = "the JSON payload", **dumps_kwargs) -> str:
    """``json.dumps(payload, **dumps_kwargs)`` as strict JSON: a NaN or infinite number is a ``ValueError`` naming
    ``what`` and the field (Python's default would write the bare ``NaN`` that strict parsers refuse)."""
    try:
        return json.dumps(payload, allow_nan=False, **dumps_kwargs)
    except ValueError:
        field = _first_nonfinite(payload)
        if field is None:
            raise
        raise ValueError(
            f"{what} holds a non-finite number at {field}: not written (strict JSON has no NaN)"
        ) from None


def parse_json(text: str, source: str | os.PathLike = "JSON text") -> Any:
    """``json.loads(text)``, refusing ``NaN`` / ``Infinity`` (which strict JSON does not have) naming ``source``."""

    def refuse(constant: str):
        raise ValueError(f"{source} holds {constant}, which strict JSON does not allow (a diverged run?)")

    return json.loads(text, parse_constant=refuse)


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """:func:`atomic_write_text` of ``payload`` as indented strict JSON (keys in their order) and a final newline."""
    atomic_write_text(path, json_text(payload, str(path), indent=2, sort_keys=False) + "\n")


def sha256_bytes(payload: bytes) -> str:
    """Hex SHA-256 of ``payload``."""
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(payload: Any) -> str:
    """SHA-256 of ``payload``'s canonical JSON (sorted keys): a fingerprint of ids, checksums, settings."""
    return sha256_bytes(json_text(payload, "a fingerprinted payload", sort_keys=True).encode("utf-8"))


# ---- directories: built under a temporary name, swapped in with two renames ----


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
    """Swap the finished directory ``temporary`` into ``path`` (old content moved aside first); its files get the
    umask's permissions first (group members of a shared run directory can read the models)."""
    path = Path(path)
    honour_umask(temporary)
    recover_directory(path)
    old = _old_name(path)
    if path.exists():
        os.replace(path, old)
    os.replace(temporary, path)
    if old.exists():
        shutil.rmtree(old)
