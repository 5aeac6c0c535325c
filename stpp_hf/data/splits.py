"""Split files: read, write, generate, and the standard partitions shipped with the package.

A split file lists one sample per line, ``<image path> <mask path>``, relative to the dataset root
(docs/method.md §7). A line holding only an image path is valid for unlabeled images. Paths that hold
spaces are written ``<image path><TAB><mask path>``: a line with a tab is split at tabs only. Files are
UTF-8 (a byte-order mark is skipped). A missing final newline is tolerated; malformed lines and duplicate
images are errors that name the line.

The partitions of the paper ship as package data and are addressed by name::

    shipped_split_path("pascal/1_16/split_0/labeled")   # .../splits/pascal/1_16/split_0/labeled.txt
    shipped_split_path("pascal/val")
    shipped_split_files("cityscapes", "1_30/split_0")   # {"labeled": ..., "unlabeled": ..., "val": ...}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..file_io import atomic_write_bytes
from ..log import get_logger
from .images import resolved_path, undecoded

SHIPPED_SPLITS_DIR = Path(__file__).parent / "splits"
SPLIT_PARTS = ("labeled", "unlabeled", "val")
OVERLAP_EXAMPLES = 5

logger = get_logger(__name__)


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: paths relative to the dataset root (``mask`` is ``None`` when absent)."""

    image: str
    mask: str | None = None

    def to_line(self) -> str:
        """``image mask``, or ``image<TAB>mask`` when a path holds a space."""
        paths = [self.image] if self.mask is None else [self.image, self.mask]
        if any(character in path for path in paths for character in "\t\r\n"):
            raise ValueError(f"split paths cannot hold tabs or line breaks: {paths}")
        return ("\t" if any(" " in path for path in paths) else " ").join(paths)


def parse_split(text: str, source: str = "<split>", require_masks: bool = False) -> list[SplitEntry]:
    """Parse split-file ``text``; ``source`` names the file in error messages."""
    entries, first_line_of = [], {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = [field.strip() for field in line.strip().split("\t")] if "\t" in line.strip() else line.split()
        if not fields:
            continue
        if len(fields) > 2 or "" in fields:
            hint = "" if "\t" in line else " (paths with spaces: separate image and mask with a tab)"
            raise ValueError(
                f"{source}:{line_number}: expected '<image> [<mask>]', got {len(fields)} fields{hint}: {line!r}"
            )
        if require_masks and len(fields) == 1:
            raise ValueError(f"{source}:{line_number}: a mask path is required here, got only {fields[0]!r}")
        image = fields[0]
        if image in first_line_of:
            raise ValueError(
                f"{source}:{line_number}: duplicate image {image!r} (first on line {first_line_of[image]})"
            )
        first_line_of[image] = line_number
        entries.append(SplitEntry(image, fields[1] if len(fields) == 2 else None))
    if not entries:
        raise ValueError(f"{source}: the split is empty")
    return entries


def read_split_text(path: Path) -> str:
    """The text of split file ``path``: UTF-8, a leading byte-order mark skipped; other encodings are an
    error naming the file."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"split file {path} is not UTF-8 text (byte {error.start}: "
            f"{error.object[error.start : error.start + 1]!r}); save it as UTF-8"
        ) from None


def read_split(path: str | os.PathLike, require_masks: bool = False) -> list[SplitEntry]:
    """The entries of split file ``path`` (a file path or a shipped name, see :func:`resolve_split_file`)."""
    path = resolve_split_file(path)
    return parse_split(read_split_text(path), source=str(path), require_masks=require_masks)


def write_split(path: str | os.PathLike, entries: Iterable[SplitEntry]) -> Path:
    """Write ``entries`` to ``path`` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(entry.to_line() + "\n" for entry in entries)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


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
        raise ValueError(
            f"num_labeled must be in [1, {len(entries) - 1}] for {len(entries)} entries, got {num_labeled}"
        )
    labeled_indices = draw_labeled(len(entries), num_labeled, seed, strata)
    labeled = [entry for index, entry in enumerate(entries) if index in labeled_indices]
    unlabeled = [entry for index, entry in enumerate(entries) if index not in labeled_indices]
    output_dir = Path(output_dir)
    return {
        "labeled": write_split(output_dir / "labeled.txt", labeled),
        "unlabeled": write_split(output_dir / "unlabeled.txt", unlabeled),
    }


def draw_labeled(num_entries: int, num_labeled: int, seed: int = 0, strata: Sequence[str] | None = None) -> set[int]:
    """The positions among ``num_entries`` that a partition with ``num_labeled`` labeled ones labels: each stratum
    (one key per entry) contributes in proportion to its size (largest remainders), its members drawn by a
    ``torch`` generator seeded with ``seed``."""
    if strata is not None and len(strata) != num_entries:
        raise ValueError(f"strata has {len(strata)} keys for {num_entries} entries")
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(strata if strata is not None else [""] * num_entries):
        groups.setdefault(key, []).append(index)
    quotas = {key: num_labeled * len(members) / num_entries for key, members in groups.items()}
    counts = {key: math.floor(quota) for key, quota in quotas.items()}
    by_remainder = sorted(groups, key=lambda key: quotas[key] - counts[key], reverse=True)
    for key in by_remainder[: num_labeled - sum(counts.values())]:
        counts[key] += 1
    labeled_indices = set()
    for key, members in groups.items():
        order = torch.randperm(len(members), generator=generator).tolist()
        labeled_indices.update(members[position] for position in order[: counts[key]])
    return labeled_indices


def list_shipped_splits() -> list[str]:
    """Names of every shipped split file, e.g. ``"pascal/1_16/split_0/labeled"``, ``"pascal/val"``."""
    return sorted(
        path.relative_to(SHIPPED_SPLITS_DIR).with_suffix("").as_posix() for path in SHIPPED_SPLITS_DIR.rglob("*.txt")
    )


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


def _identities(part) -> tuple[list[str], list[str | None]]:
    """Ids and real image paths (``None`` where unknown) of a ``datasets.Dataset`` or a sequence of ids."""
    if not hasattr(part, "features"):
        ids = [str(image_id) for image_id in part]
        return ids, [None] * len(ids)
    columns = undecoded(part.select_columns([c for c in ("id", "image") if c in part.column_names]), ("image",))
    ids = list(columns["id"])
    if "image" not in columns.column_names:
        return ids, [None] * len(ids)
    return ids, [resolved_path(value) for value in columns["image"]]


def _shared(part: tuple[list[str], list[str | None]], others: tuple[list[str], list[str | None]]) -> list[str]:
    """Images of ``part`` that are in ``others`` too, by id or by real image path, as ``id`` or ``id (path)``."""
    other_ids, other_paths = set(others[0]), set(path for path in others[1] if path is not None)
    shared = []
    for image_id, path in zip(*part):
        if image_id in other_ids:
            shared.append(image_id)
        elif path is not None and path in other_paths:
            shared.append(f"{image_id} ({path})")
    return shared


def check_split_overlap(labeled, unlabeled, val) -> None:
    """Refuse a val set that shares images with the training sets; warn about labeled images also listed
    as unlabeled.

    Each argument is a ``datasets.Dataset`` of :func:`~stpp_hf.data.load_source` (images are compared by id
    and by real path, so one file under two ids or two roots is found) or a sequence of ids.
    Raises ``ValueError`` naming counts and a few ids: val mIoU measured on training images says nothing.
    """
    labeled, unlabeled, val = _identities(labeled), _identities(unlabeled), _identities(val)
    in_labeled, in_unlabeled = _shared(val, labeled), _shared(val, unlabeled)
    if in_labeled or in_unlabeled:
        examples = ", ".join(list(dict.fromkeys(in_labeled + in_unlabeled))[:OVERLAP_EXAMPLES])
        raise ValueError(
            f"the val set ({len(val[0])} images) shares {len(in_labeled)} images with the labeled set and "
            f"{len(in_unlabeled)} with the unlabeled set (e.g. {examples}); val mIoU would be measured on training "
            f"images: remove them from the val split or from the training splits"
        )
    both = _shared(labeled, unlabeled)
    if both:
        logger.warning(
            "%d of %d labeled images are also in the unlabeled set (e.g. %s); they are trained on with their mask "
            "and with a pseudo label. The paper's partitions are disjoint: remove them from the unlabeled split",
            len(both),
            len(labeled[0]),
            ", ".join(both[:OVERLAP_EXAMPLES]),
        )
