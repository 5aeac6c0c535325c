"""Split files: read, write, generate, and the standard partitions shipped with the package.

A split file lists one sample per line, ``<image path> <mask path>``, relative to the dataset root
(spec section 7). A line holding only an image path is valid for unlabeled images. A missing final
newline is tolerated; malformed lines and duplicate images are errors that name the line.

The partitions of the paper ship as package data and are addressed by name::

    shipped_split_path("pascal/1_16/split_0/labeled")   # .../splits/pascal/1_16/split_0/labeled.txt
    shipped_split_path("pascal/val")
    shipped_split_files("cityscapes", "1_30/split_0")   # {"labeled": ..., "unlabeled": ..., "val": ...}
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

SHIPPED_SPLITS_DIR = Path(__file__).parent / "splits"
SPLIT_PARTS = ("labeled", "unlabeled", "val")


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: paths relative to the dataset root (``mask`` is ``None`` when absent)."""

    image: str
    mask: str | None = None

    def to_line(self) -> str:
        return self.image if self.mask is None else f"{self.image} {self.mask}"


def parse_split(text: str, source: str = "<split>", require_masks: bool = False) -> list[SplitEntry]:
    """Parse split-file ``text``; ``source`` names the file in error messages."""
    entries, first_line_of = [], {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ValueError(f"{source}:{line_number}: expected '<image> [<mask>]', got {len(fields)} fields: {line!r}")
        if require_masks and len(fields) == 1:
            raise ValueError(f"{source}:{line_number}: a mask path is required here, got only {fields[0]!r}")
        image = fields[0]
        if image in first_line_of:
            raise ValueError(f"{source}:{line_number}: duplicate image {image!r} (first on line {first_line_of[image]})")
        first_line_of[image] = line_number
        entries.append(SplitEntry(image, fields[1] if len(fields) == 2 else None))
    if not entries:
        raise ValueError(f"{source}: the split is empty")
    return entries


def read_split(path: str | os.PathLike, require_masks: bool = False) -> list[SplitEntry]:
    """The entries of split file ``path`` (a file path or a shipped name, see :func:`resolve_split_file`)."""
    path = resolve_split_file(path)
    return parse_split(path.read_text(encoding="utf-8"), source=str(path), require_masks=require_masks)


def write_split(path: str | os.PathLike, entries: Iterable[SplitEntry]) -> Path:
    """Write ``entries`` to ``path`` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(entry.to_line() + "\n" for entry in entries)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def generate_split(
    entries: Sequence[SplitEntry],
    output_dir: str | os.PathLike,
    num_labeled: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    strata: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Draw a labeled / unlabeled partition of ``entries`` and write ``labeled.txt`` and ``unlabeled.txt``.

    Give ``num_labeled`` or ``fraction`` (of ``len(entries)``). With ``strata`` (one key per entry,
    e.g. the dominant class or the city), each stratum contributes labeled images in proportion to
    its size (largest remainders), so rare strata are not left out by chance.
    Returns ``{"labeled": path, "unlabeled": path}``.
    """
    if (num_labeled is None) == (fraction is None):
        raise ValueError("give exactly one of num_labeled and fraction")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        num_labeled = max(1, round(fraction * len(entries)))
    if not 0 < num_labeled < len(entries):
        raise ValueError(f"num_labeled must be in [1, {len(entries) - 1}] for {len(entries)} entries, got {num_labeled}")
    if strata is not None and len(strata) != len(entries):
        raise ValueError(f"strata has {len(strata)} keys for {len(entries)} entries")
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(strata if strata is not None else [""] * len(entries)):
        groups.setdefault(key, []).append(index)
    quotas = {key: num_labeled * len(members) / len(entries) for key, members in groups.items()}
    counts = {key: math.floor(quota) for key, quota in quotas.items()}
    by_remainder = sorted(groups, key=lambda key: quotas[key] - counts[key], reverse=True)
    for key in by_remainder[: num_labeled - sum(counts.values())]:
        counts[key] += 1
    labeled_indices = set()
    for key, members in groups.items():
        order = torch.randperm(len(members), generator=generator).tolist()
        labeled_indices.update(members[position] for position in order[: counts[key]])
    labeled = [entry for index, entry in enumerate(entries) if index in labeled_indices]
    unlabeled = [entry for index, entry in enumerate(entries) if index not in labeled_indices]
    output_dir = Path(output_dir)
    return {
        "labeled": write_split(output_dir / "labeled.txt", labeled),
        "unlabeled": write_split(output_dir / "unlabeled.txt", unlabeled),
    }


def list_shipped_splits() -> list[str]:
    """Names of every shipped split file, e.g. ``"pascal/1_16/split_0/labeled"``, ``"pascal/val"``."""
    return sorted(path.relative_to(SHIPPED_SPLITS_DIR).with_suffix("").as_posix() for path in SHIPPED_SPLITS_DIR.rglob("*.txt"))


def shipped_split_path(name: str) -> Path:
    """The package file of the shipped split ``name`` (see :func:`list_shipped_splits`)."""
    path = SHIPPED_SPLITS_DIR / f"{name.strip('/')}.txt"
    if ".." in Path(name).parts or not path.is_file():
        datasets = sorted(p.name for p in SHIPPED_SPLITS_DIR.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no shipped split named {name!r}; names look like 'pascal/1_16/split_0/labeled' or 'pascal/val' "
            f"(datasets: {', '.join(datasets)}; all names: stpp_hf.data.splits.list_shipped_splits())"
        )
    return path


def shipped_split_files(dataset: str, partition: str) -> dict[str, Path]:
    """``{"labeled", "unlabeled", "val"}`` files of a shipped partition, e.g. ``("pascal", "1_16/split_0")``."""
    partition = partition.strip("/")
    return {
        "labeled": shipped_split_path(f"{dataset}/{partition}/labeled"),
        "unlabeled": shipped_split_path(f"{dataset}/{partition}/unlabeled"),
        "val": shipped_split_path(f"{dataset}/val"),
    }


def resolve_split_file(split: str | os.PathLike) -> Path:
    """An existing file path as is; otherwise a shipped split name such as ``"pascal/val"``."""
    path = Path(split)
    if path.is_file():
        return path
    if path.suffix == ".txt" or path.is_absolute():
        raise FileNotFoundError(f"split file {path} does not exist")
    return shipped_split_path(str(split))
