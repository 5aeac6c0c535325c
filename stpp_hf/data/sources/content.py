"""What a local dataset is, by content: the SHA-256 of every file its split lists, named relative to the data root.

A run identifies its data by :func:`content_record` (not by paths, sizes or modification times), so a file restored
with a new mtime, a dataset moved to another root, or a run directory moved with its generated data is still the
same data. The hashes are kept per file (:class:`FileHashes`, a JSON file in the run directory) with the size and
mtime they were computed at: a relaunch hashes again only the files whose size or mtime changed, and names the
files that differ when the content did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ...file_io import atomic_write_json, sha256_file, sha256_json
from .base import DatasetSource, Record

FILE_HASHES_VERSION = 1
SHOWN_NAMES = 5  # files named per kind of change in a refusal; the rest are counted


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to the data root, POSIX-style (``..`` where the split points outside it)."""
    return Path(os.path.relpath(path, root)).as_posix()


class FileHashes:
    """The SHA-256 of each data file of a run, by part (``labeled``, ``unlabeled``, ``val``), kept in ``path``.

    Layout: ``{"version", "parts": {part: {"root": absolute data root, "files": {relative name: [size, mtime_ns,
    sha256]}}}}``. A file whose size and mtime are those recorded under the same root is not read again.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.saved: dict[str, dict] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("version") == FILE_HASHES_VERSION and isinstance(data.get("parts"), dict):
                    self.saved = data["parts"]
            except (ValueError, AttributeError):
                pass  # a torn cache: every file is hashed again (the run's identity does not rest on it)
        self.parts: dict[str, dict] = {}

    def content_record(self, part: str, source: DatasetSource, root: Path, records: Sequence[Record]) -> dict:
        """``{"content_sha256", "num_images"}`` of ``records`` under ``root``: the source, each record's id and the
        relative name and SHA-256 of its image and mask. Missing files are reported by name."""
        root = Path(root).resolve()
        previous = self.saved.get(part, {})
        cached = previous.get("files", {}) if previous.get("root") == str(root) else {}
        files, rows = {}, []
        for record in records:
            row = [record.id]
            for what, path in (("image", record.image), ("mask", record.mask)):
                if path is None:
                    row += [None, None]
                    continue
                name = relative_name(path, root)
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    raise FileNotFoundError(f"{what} {path} (id {record.id!r}) does not exist") from None
                known = cached.get(name)
                if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
                    digest = known[2]
                else:
                    digest = sha256_file(path)
                files[name] = [stat.st_size, stat.st_mtime_ns, digest]
                row += [name, digest]
            rows.append(row)
        self.parts[part] = {"root": str(root), "files": files}
        identity = {"source": source.name, "num_labels": source.num_labels, "records": rows}
        return {"content_sha256": sha256_json(identity), "num_images": len(records)}

    def changes(self, part: str) -> str | None:
        """The files of ``part`` added, removed or changed since the saved hashes, a few of each named and the rest
        counted (``None`` without saved hashes of ``part``)."""
        if part not in self.saved or part not in self.parts:
            return None
        before = {name: entry[2] for name, entry in self.saved[part].get("files", {}).items()}
        after = {name: entry[2] for name, entry in self.parts[part]["files"].items()}
        kinds = {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(name for name in set(before) & set(after) if before[name] != after[name]),
        }
        described = []
        for kind, names in kinds.items():
            if names:
                shown = ", ".join(names[:SHOWN_NAMES])
                more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
                described.append(f"{len(names)} {kind} ({shown}{more})")
        if not described:
            return "the same files, listed in another order or under other ids"
        return "; ".join(described)

    def save(self) -> None:
        """Write the hashes computed by :meth:`content_record` (once the run accepted them)."""
        atomic_write_json(self.path, {"version": FILE_HASHES_VERSION, "parts": self.parts})
