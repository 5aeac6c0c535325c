"""Disk-full errors that say where and how much: every artefact write of a run (atomic files, ``save_pretrained``
models, ``accelerator.save_state`` checkpoints, pseudo-label PNGs) runs inside :func:`disk_full_errors`, which
removes the write's temporary file or directory and names the path, the free space and what the write needed."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# how a full disk shows in the writers of a run: the OS error, safetensors' message, torch's zip writer (which
# reports only that the file position is not where it wrote to)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "unexpected pos")


class DiskFullError(OSError):
    """A write that ran out of space; the message names the file, the free space and what the write needed."""


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(error, Exception) and any(text in str(error) for text in _DISK_FULL_MESSAGES)


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return path.stat().st_size if path.exists() else 0


def tensor_bytes(state_dict: dict) -> int:
    """The bytes of the tensors of ``state_dict``: what saving it needs, give or take the file headers."""
    return sum(value.numel() * value.element_size() for value in state_dict.values() if hasattr(value, "numel"))


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@contextmanager
def disk_full_errors(
    path: str | os.PathLike, needed: int | None = None, partial: str | os.PathLike | None = None
) -> Iterator[None]:
    """Around a write of ``path``: a full disk (whichever library reports it, however) becomes a
    :class:`DiskFullError` naming ``path``, the file system's free space and what the write needed, after
    ``partial`` (its temporary file or directory, if any) is removed. Other errors pass unchanged.

    Args:
        path: the file or directory being written.
        needed: its size in bytes, if known (else the size ``partial`` reached is reported).
        partial: the temporary file or directory the write fills, removed on any error.
    """
    try:
        yield
    except BaseException as error:
        written = 0
        if partial is not None:
            partial = Path(partial)
            written = _size_of(partial) if _is_disk_full(error) else 0
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        if not _is_disk_full(error):
            raise
        directory = Path(path).parent
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
        free = shutil.disk_usage(directory).free
        if needed is not None:
            need = f"the write needed {_mib(needed)}"
        elif written:
            need = f"the write needed more than the {_mib(written)} written when it filled"
        else:
            need = "the write's size is not known"
        removed = f"; the partial {partial} was removed" if partial is not None else ""
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the device writing {path}: the file system of {directory} has {_mib(free)} free, "
            f"{need}{removed}. Free space there (or move the run directory to a bigger disk and "
            f"relaunch with --output_dir there: the run resumes)",
        ) from error
