"""A safe on-disk cache of pseudo labels: one single-channel palette PNG per unlabeled image.

Layout of a store (one directory per teacher and stage, see :meth:`PseudoLabelStore.for_teacher`)::

    store.json                         {"version", "fingerprint"}: the teacher this store belongs to
    labels/<id, percent-encoded>.png   e.g. labels/train%2Faachen%2Faachen_000000_000019.png; an id whose
                                       encoding is over 100 characters: its first 64, "+", 32 hex of its SHA-256
    journal-<host>-<pid>-<n>.jsonl     one manifest entry per line, appended by the process that wrote it
    manifest.json                      {"entries": {id: {"file", "size", "height", "width", "sha256"}}},
                                       the journals merged, written by :meth:`verify`

Ids are percent-encoded into file names, so ids with ``/`` (Cityscapes cities) never collide and
map back unambiguously; long or non-ASCII ids (a CJK character takes 9 characters) are shortened with a
hash ("+" never occurs in an encoded id, so the two forms cannot collide), which keeps every name, with the
temporary file's suffix, under 120 characters (the limit is 255 bytes, 143 on eCryptfs).
:func:`check_label_file_names` tries the longest name of a run's ids on its file system before any training.
A manifest entry's file must resolve into the store's ``labels/``: a damaged or edited manifest cannot make
the store read elsewhere. Every PNG is written to a temporary file and renamed; its manifest entry is
appended to the writer's own journal afterwards, so several processes can label disjoint shards at
once and a killed writer leaves at most an unrecorded file, which :meth:`pending` reports as to do.
A missing entry, a missing file, or a size or checksum mismatch is an error naming the id, never a
silent skip.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import socket
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

import numpy as np
from PIL import Image

from ..disk_full import disk_full_errors
from ..file_io import atomic_write_bytes, json_text, sha256_bytes, sha256_file, temporary_sibling
from ..log import get_logger
from ..models.deeplab.label_presets import colorize

logger = get_logger(__name__)

STORE_VERSION = 1
LABELS_DIR, MANIFEST_FILE, META_FILE = "labels", "manifest.json", "store.json"
# encoded ids up to this many characters name their file as they are (as before: ordinary ids keep their names)
MAX_READABLE_NAME, HASHED_NAME_PREFIX, HASHED_NAME_DIGEST = 100, 64, 32
_writer_counter = itertools.count()


def teacher_fingerprint(model_dir: str | os.PathLike) -> str:
    """SHA-256 over the names and contents of the files of a ``save_pretrained`` directory."""
    model_dir = Path(model_dir)
    files = sorted(path for path in model_dir.rglob("*") if path.is_file())
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode("utf-8") + b"\0")
        digest.update(sha256_file(path).encode("ascii"))
    return digest.hexdigest()


class PseudoLabelStore:
    """Pseudo labels of one (teacher, stage) under ``directory``.

    Args:
        directory: the store's directory (created if missing).
        palette: flat ``[r, g, b, ...]`` colour map saved in each PNG (``None``: grey PNGs).
        fingerprint: the teacher's fingerprint; opening a store made by another teacher is an error.
    """

    def __init__(
        self, directory: str | os.PathLike, palette: Sequence[int] | None = None, fingerprint: str | None = None
    ):
        self.directory = Path(directory)
        self.palette = None if palette is None else list(palette)
        self.fingerprint = fingerprint
        (self.directory / LABELS_DIR).mkdir(parents=True, exist_ok=True)
        self._check_meta()
        self._journal: Path | None = None
        self._entries: dict[str, dict] | None = None

    @classmethod
    def for_teacher(
        cls, root: str | os.PathLike, teacher: str, stage: str, palette: Sequence[int] | None = None
    ) -> "PseudoLabelStore":
        """The store of ``stage`` labeled by the teacher with fingerprint ``teacher`` under ``root``."""
        return cls(Path(root) / f"{stage}-{teacher[:16]}", palette=palette, fingerprint=teacher)

    def _read_meta(self, meta_path: Path) -> dict | None:
        """``store.json``'s content; ``None`` when it is torn or malformed and the teacher is known, so it
        is written again (the directory name of :meth:`for_teacher` already ties the store to its teacher)."""
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict):
            return meta
        if self.fingerprint is None:
            raise ValueError(
                f"{meta_path} is not a pseudo-label store header (a JSON object with 'version' and 'fingerprint'); "
                f"delete {self.directory} to label its images again"
            )
        logger.warning("%s is torn or malformed: writing it again for teacher %s", meta_path, self.fingerprint[:16])
        return None

    def _check_meta(self) -> None:
        meta_path = self.directory / META_FILE
        meta = self._read_meta(meta_path) if meta_path.is_file() else None
        if meta is not None:
            if meta.get("version") != STORE_VERSION:
                raise ValueError(f"{meta_path}: store version {meta.get('version')}, expected {STORE_VERSION}")
            if self.fingerprint is not None and meta.get("fingerprint") not in (None, self.fingerprint):
                raise ValueError(
                    f"{self.directory} holds pseudo labels of teacher {meta['fingerprint'][:16]}, not "
                    f"{self.fingerprint[:16]}; use another directory or delete it"
                )
            self.fingerprint = self.fingerprint or meta.get("fingerprint")
        else:
            meta = {"version": STORE_VERSION, "fingerprint": self.fingerprint}
            atomic_write_bytes(meta_path, json_text(meta, str(meta_path)).encode("utf-8"))

    # ---- paths and manifest ---------------------------------------------------------------------
    @staticmethod
    def file_name(image_id: str) -> str:
        """``labels/<percent-encoded id>.png``, unambiguous even when ids hold ``/``; an encoding over 100
        characters becomes ``<its first 64>+<32 hex of the id's SHA-256>``."""
        stem = quote(image_id, safe="", errors="surrogateescape")  # surrogates: undecodable bytes of file names
        if len(stem) > MAX_READABLE_NAME:
            prefix = stem[:HASHED_NAME_PREFIX]
            cut = prefix.rfind("%", len(prefix) - 2)
            digest = sha256_bytes(image_id.encode("utf-8", "surrogateescape"))
            stem = f"{prefix if cut < 0 else prefix[:cut]}+{digest[:HASHED_NAME_DIGEST]}"
        return f"{LABELS_DIR}/{stem}.png"

    def _labels_root(self) -> Path:
        """The store's ``labels/`` with every symlink resolved."""
        return (self.directory / LABELS_DIR).resolve()

    def _label_path(self, entry: dict, labels_root: Path | None = None) -> Path | None:
        """The file of manifest ``entry``, or ``None`` when it does not resolve into the store's ``labels/``.

        ``labels_root``: :meth:`_labels_root`, resolved once by callers that check many entries.
        """
        labels_root = labels_root or self._labels_root()
        folder, _, name = entry["file"].partition("/")
        if folder == LABELS_DIR and name not in ("", ".", "..") and "/" not in name:
            path = labels_root / name
            if not path.is_symlink():  # the usual entry: the same path as resolving it, for one lstat, not one per
                return path  # component of the store's absolute path
        path = (self.directory / entry["file"]).resolve()
        return path if path.is_relative_to(labels_root) else None

    def _read_manifest(self) -> dict[str, dict]:
        """The entries of ``manifest.json``; none when it is missing, torn or malformed: the journals hold
        every entry the manifest merged, so :meth:`verify` rebuilds it from them."""
        manifest = self.directory / MANIFEST_FILE
        if not manifest.is_file():
            return {}
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8"))["entries"]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
            entries = None
        if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
            logger.warning("%s is torn or malformed: rebuilding the store's entries from its journals", manifest)
            return {}
        return entries

    def _read_entries(self) -> dict[str, dict]:
        """The manifest merged with every journal (journal lines are newer)."""
        entries = self._read_manifest()
        for journal in sorted(self.directory.glob("journal-*.jsonl")):
            lines = journal.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # a writer killed mid-line; its file counts as not written
                        continue
                    raise ValueError(f"{journal}:{number}: corrupt journal line") from None
                entries[entry["id"]] = entry
        return entries

    def entries(self, refresh: bool = True) -> dict[str, dict]:
        """``{id: {"id", "file", "size", "height", "width", "sha256"}}`` of every recorded label."""
        if refresh or self._entries is None:
            self._entries = self._read_entries()
        return self._entries

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.entries(refresh=False)

    def __len__(self) -> int:
        return len(self.entries())

    # ---- writing --------------------------------------------------------------------------------
    def put(self, image_id: str, label_map) -> dict:
        """Store ``label_map`` (``[H, W]`` integers in ``[0, 255]``, numpy or torch) as the label of
        ``image_id``; returns its manifest entry."""
        array = np.asarray(label_map)
        if array.ndim != 2:
            raise ValueError(f"pseudo label of {image_id!r} must be [H, W], got shape {array.shape}")
        if array.dtype.kind not in "ui" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"pseudo label of {image_id!r} must hold integers in [0, 255], got dtype {array.dtype}")
        buffer = io.BytesIO()
        colorize(array, self.palette).save(buffer, format="PNG")
        return self.put_encoded(image_id, buffer.getvalue(), width=int(array.shape[1]), height=int(array.shape[0]))

    def put_encoded(self, image_id: str, payload: bytes, width: int, height: int) -> dict:
        """Store ``payload``, an encoded ``width`` x ``height`` image, as the file of ``image_id`` (atomically,
        then journaled); returns its manifest entry."""
        relative = self.file_name(image_id)
        atomic_write_bytes(self.directory / relative, payload)
        entry = {
            "id": image_id,
            "file": relative,
            "size": len(payload),
            "height": height,
            "width": width,
            "sha256": sha256_bytes(payload),
        }
        self._append_journal(entry)
        if self._entries is not None:
            self._entries[image_id] = entry
        return entry

    def _append_journal(self, entry: dict) -> None:
        if self._journal is None:
            writer = f"{socket.gethostname()}-{os.getpid()}-{next(_writer_counter)}"
            self._journal = self.directory / f"journal-{writer}.jsonl"
        # one short line per append: a crash can only tear the last line, which _read_entries tolerates
        with disk_full_errors(self._journal), open(self._journal, "a", encoding="utf-8") as stream:
            stream.write(json_text(entry, "a pseudo-label journal entry") + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    # ---- checking -------------------------------------------------------------------------------
    def _problem(self, image_id: str, entry: dict | None, labels_root: Path) -> str | None:
        """Why the label of ``image_id`` is not usable, or ``None`` when it is.

        ``labels_root``: :meth:`_labels_root`.
        """
        if entry is None:
            return "no manifest entry"
        path = self._label_path(entry, labels_root)
        if path is None:
            return f"its entry names {entry['file']!r}, outside {self.directory / LABELS_DIR}"
        if not path.is_file():
            return f"file {path} is missing"
        if (size := path.stat().st_size) != entry["size"]:
            return f"file {path} has {size} bytes, the manifest says {entry['size']}"
        if sha256_file(path) != entry["sha256"]:
            return f"file {path} does not match its checksum"
        return None

    def pending(self, ids: Iterable[str]) -> list[str]:
        """The ids (in the given order) whose label is missing or corrupt: what is left to do."""
        entries, labels_root = self.entries(), self._labels_root()
        return [i for i in ids if self._problem(i, entries.get(i), labels_root) is not None]

    def verify(self, ids: Iterable[str]) -> None:
        """Check that every id has an intact label, then write the merged ``manifest.json``.

        Raises ``ValueError`` naming the first bad ids and why.
        """
        ids = list(ids)
        entries, labels_root = self.entries(), self._labels_root()
        problems = [(i, p) for i in ids if (p := self._problem(i, entries.get(i), labels_root)) is not None]
        if problems:
            listed = "; ".join(f"{image_id!r}: {problem}" for image_id, problem in problems[:5])
            raise ValueError(
                f"pseudo-label store {self.directory}: {len(problems)} of {len(ids)} labels unusable ({listed})"
            )
        manifest = {
            "version": STORE_VERSION,
            "fingerprint": self.fingerprint,
            "entries": dict(sorted(entries.items())),
        }
        atomic_write_bytes(
            self.directory / MANIFEST_FILE, json_text(manifest, MANIFEST_FILE, indent=1).encode("utf-8")
        )

    # ---- reading --------------------------------------------------------------------------------
    def file_path(self, image_id: str) -> Path:
        """The recorded file of ``image_id``; errors name the store and the id."""
        entry = self._entry(image_id)
        path = self._label_path(entry)
        if path is None:
            raise ValueError(
                f"pseudo-label store {self.directory}: the entry of {image_id!r} names {entry['file']!r}, outside "
                f"{self.directory / LABELS_DIR}; the manifest or a journal was edited or damaged: label the id again"
            )
        return path

    def _entry(self, image_id: str) -> dict:
        entry = self.entries(refresh=False).get(image_id) or self.entries().get(image_id)
        if entry is None:
            raise KeyError(f"pseudo-label store {self.directory} has no label for id {image_id!r}")
        return entry

    def open(self, image_id: str) -> Image.Image:
        """The label of ``image_id`` as a single-channel PIL image (mode ``P`` or ``L``)."""
        entry, path = self._entry(image_id), self.file_path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"pseudo label of {image_id!r} ({path}) is missing")
        image = Image.open(path)
        image.load()
        if image.size != (entry["width"], entry["height"]):
            raise ValueError(
                f"pseudo label {path} of {image_id!r} is {image.size}, "
                f"the manifest says {entry['width']}x{entry['height']}"
            )
        return image

    def get(self, image_id: str) -> np.ndarray:
        """The label of ``image_id`` as ``[H, W]`` uint8 class indices."""
        return np.array(self.open(image_id))

    def __getstate__(self) -> dict:
        # DataLoader workers get their own journal (and re-read entries lazily)
        return {**self.__dict__, "_journal": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r})"


def check_label_file_names(directory: str | os.PathLike, ids: Iterable[str]) -> None:
    """Check, before any training, that the pseudo labels of ``ids`` can be written under ``directory`` (a run's
    pseudo-label root, created if missing): the longest file name they get, as the temporary file a store
    writes first, is created and removed there. Raises ``ValueError`` naming the id and the file system's
    complaint, so a file system with short names (eCryptfs, some network shares) fails now, not after SupOnly.
    """
    ids = list(ids)
    if not ids:
        return
    longest = max(ids, key=lambda image_id: len(PseudoLabelStore.file_name(image_id)))
    name = Path(PseudoLabelStore.file_name(longest)).name
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        handle, probe = temporary_sibling(directory / name)  # the name atomic_write_bytes writes first
    except OSError as error:
        raise ValueError(
            f"cannot create a pseudo-label file for id {longest!r} in {directory} ({len(name)}-character name "
            f"{name!r}): {error}; put the run directory on another file system"
        ) from error
    os.close(handle)
    os.unlink(probe)
