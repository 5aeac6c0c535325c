"""The data of a run with a local dataset (a ``--data_root`` layout or the synthetic data), identified by content
before any dataset cache is built or anything else in the run directory is written.

:func:`identify_local_data` gives the run config's ``data`` section (:mod:`stpp_hf.data.sources.content`);
:func:`check_local_data` refuses a relaunch on other data naming the files added, removed or changed, and takes
over a run directory written when the data was identified by paths, sizes and mtimes (the ``fingerprint`` of each
part) if those still match. :func:`check_hub_data` does the same for the data of a ``datasets`` dataset, identified
by :mod:`stpp_hf.data.hub.identity`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from ..data import make_synthetic_dataset
from ..data.sources import get_source
from ..data.sources.base import fingerprint
from ..data.sources.content import FileHashes
from ..data.splits import read_split_text, resolve_split_file
from ..file_io import atomic_write_json
from ..log import get_logger
from .config import RunConfig
from .errors import ConfigError
from .run_layout import RunLayout

logger = get_logger(__name__)

PARTS = ("labeled", "unlabeled", "val")


@dataclass(frozen=True)
class LocalData:
    """Where a local run's data is: the ``source`` layout under ``root``, one split file per part, its classes."""

    source: str
    root: Path
    split_files: dict
    id2label: dict[int, str]
    palette: list[int] | None

    def records(self, part: str):
        return get_source(self.source).records(self.root, resolve_split_file(self.split_files[part]))


def local_data(config: RunConfig, output_dir: Path, accelerator) -> LocalData:
    """The :class:`LocalData` of the run; the synthetic data is generated first (by the main process)."""
    if config.is_synthetic:
        with accelerator.main_process_first():
            synthetic = make_synthetic_dataset(RunLayout(output_dir).synthetic_data, **config.record()["synthetic"])
        return LocalData("pascal", Path(synthetic.root).resolve(), synthetic.split_files, synthetic.id2label,
                         synthetic.palette)  # fmt: skip
    data = config.data
    files = {"labeled": data.labeled_id_path, "unlabeled": data.unlabeled_id_path, "val": data.val_id_path}
    id2label, palette = get_source(data.dataset).classes(data.data_root)  # the data owns its classes and colours
    return LocalData(data.dataset, Path(data.data_root).resolve(), files, id2label, palette)


def identify_local_data(data: LocalData, output_dir: Path, accelerator) -> tuple[dict, FileHashes]:
    """The run config's ``data`` section (each part's content hash and size, the classes) and the file hashes
    behind it, computed by the main process (files unchanged since the last launch are not read again)."""
    hashes = FileHashes(RunLayout(output_dir).data_files)
    outcome = [None, None, None]
    if accelerator.is_main_process:
        try:
            section = {part: hashes.content_record(part, get_source(data.source), data.root, data.records(part))
                       for part in PARTS}  # fmt: skip
            outcome = [section, hashes.parts, None]
        except (OSError, ValueError) as error:  # a missing file or a bad split: every process raises it
            outcome = [None, None, error]
    section, parts, error = broadcast_object_list(outcome)
    if error is not None:
        raise error
    hashes.parts = parts
    section["id2label"] = {str(key): value for key, value in data.id2label.items()}
    return section, hashes


def check_local_data(output_dir: Path, data: LocalData, section: dict, hashes: FileHashes, write: bool) -> None:
    """Refuse ``section`` if the run directory holds a run on other data, naming the files that differ.

    A ``data`` section of the earlier format (a ``fingerprint`` per part, from paths, sizes and mtimes) is taken
    over when those fingerprints still match the files (``write``: ``run_config.json`` then records the content
    hashes); otherwise the refusal says how to go on.
    """
    layout = RunLayout(output_dir)
    saved = _saved_data_section(layout.run_config)
    if not saved:  # a new run, or an earlier record deleted as advised: the settings record writes the section
        return
    if _earlier_format(saved):
        _take_over_earlier_record(layout, data, saved, section, write)
        return
    differing = [
        part
        for part in PARTS
        if isinstance(saved.get(part), dict) and saved[part].get("content_sha256") != section[part]["content_sha256"]
    ]
    if differing:
        details = "\n".join(
            f"  {part} ({data.root}, split {data.split_files[part]}): "
            + (hashes.changes(part) or f"other files (no saved file list in {layout.data_files} to compare with)")
            for part in differing
        )
        raise ConfigError(
            f"{layout.run_dir} already holds a run on other data (relative to the data root):\n{details}\n"
            "restore the run's data to resume, or use another --output_dir"
        )


def check_hub_data(output_dir: Path, section: dict, dataset_name: str | None = None) -> None:
    """Refuse a run directory whose ``data`` section is of the earlier format for a ``datasets`` dataset (the
    ``fingerprint`` of ``datasets``' cache per part, which this version does not use), saying how to go on; once
    that section is deleted from ``run_config.json``, the settings record writes ``section``. A run
    on other rows (or, for a streamed part, another revision of the dataset) is refused naming the parts that
    differ; a streamed part saved without a revision is compared by its row ids."""
    layout = RunLayout(output_dir)
    saved = _saved_data_section(layout.run_config)
    if not saved:  # a new run, or an earlier record deleted as advised: the settings record writes the section
        return
    if _earlier_format(saved):
        raise ConfigError(
            f"{layout.run_dir} was written by an earlier version, which identified the rows of the dataset by "
            "`datasets`' cache fingerprints; this version identifies them by content (hashes of the rows' images and "
            f'labels). If the dataset is the run\'s (the same revision), delete the "data" section of '
            f"{layout.run_config} and relaunch: the data is then recorded by content. Otherwise use another "
            "--output_dir"
        )
    differing = [
        part
        for part in PARTS
        if isinstance(saved.get(part), dict) and saved[part] != _as_saved(saved[part], section[part])
    ]
    if differing:
        details = "; ".join(f"{part}: {saved[part]} -> {section[part]}" for part in differing)
        dataset = "the dataset" if dataset_name is None else f"the dataset {dataset_name}"
        raise ConfigError(
            f"{layout.run_dir} already holds a run on other rows of {dataset} (saved -> now: {details}); the "
            "dataset changed since (another revision, or edited rows): restore the run's revision to resume, or use "
            "another --output_dir"
        )


def _as_saved(saved: dict, record: dict) -> dict:
    """``record`` without its ``revision`` where the ``saved`` record has none: a streamed part recorded before the
    revision was, compared by its row ids alone."""
    return record if "revision" in saved else {key: value for key, value in record.items() if key != "revision"}


def _saved_data_section(path: Path) -> dict | None:
    """The ``data`` section of the JSON file ``path``, or ``None``."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or torn: the settings check names a torn file
    return saved.get("data") if isinstance(saved, dict) else None


def _earlier_format(saved: dict | None) -> bool:
    return bool(saved) and any(isinstance(saved.get(part), dict) and "fingerprint" in saved[part] for part in PARTS)


def _record_content(layout: RunLayout, section: dict) -> None:
    """Replace the earlier-format ``data`` section of ``run_config.json`` by ``section``."""
    logger.info("%s: the data is recorded by content from now on", layout.run_dir)
    record = json.loads(layout.run_config.read_text(encoding="utf-8"))
    atomic_write_json(layout.run_config, {**record, "data": section})


def _take_over_earlier_record(layout: RunLayout, data: LocalData, saved: dict, section: dict, write: bool) -> None:
    source = get_source(data.source)
    stale = []
    for part in PARTS:
        split_path = resolve_split_file(data.split_files[part])
        records = source.records(data.root, split_path)
        earlier = fingerprint(source, data.root, read_split_text(split_path), records, validate=True)
        if saved.get(part, {}).get("fingerprint") != earlier:
            stale.append(part)
    if stale:
        raise ConfigError(
            f"{layout.run_dir} was written by an earlier version, which identified the data by each file's path, "
            f"size and modification time, and these differ now for the {', '.join(stale)} images (a file touched, "
            "restored, edited or moved, or the data root moved); which files differ cannot be told from that record. "
            f'If the data is the run\'s (restored or moved unchanged), delete the "data" section of '
            f"{layout.run_config} and relaunch: the data is then recorded by content. Otherwise restore the data or "
            "use another --output_dir"
        )
    if write:
        _record_content(layout, section)
