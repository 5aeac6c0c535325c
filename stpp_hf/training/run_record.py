"""The record of a run directory, ``run_config.json``: every setting of the resolved
:class:`~stpp_hf.training.config.RunConfig` (:func:`settings_record`), stored once, compared with a relaunch's
(:func:`config_differences`) except the :data:`NON_RESULT_SETTINGS`, with a warning when the same global batch is
laid out otherwise on the hardware. A record of an earlier version is read in today's names (:func:`migrate_record`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from typing import Any, Mapping, Optional

from ..file_io import atomic_write_json
from ..log import get_logger
from .errors import ConfigError
from .options import HubDataArguments
from .recipe import HUB, SYNTHETIC
from .run_layout import RunLayout

logger = get_logger(__name__)

# settings that cannot change the trained weights or the reported numbers: a relaunch may change them
NON_RESULT_SETTINGS = frozenset(
    {
        "output_dir",
        "report_to",
        "push_to_hub",
        "hub_model_id",
        "hub_private",
        "push_stage_branches",
        "num_workers",
        "save_steps",
        "dry_run",
        "redo_stage",
        # where the data lies: the data is identified by content (the ``data`` section), so it may move
        "data_root",
        "labeled_id_path",
        "unlabeled_id_path",
        "val_id_path",
        "label_next",
        "activation_checkpointing",  # the same loss, gradients and BatchNorm buffers bit for bit
        "allow_emulated_precision",
    }
)
# how the global batch is laid out on the hardware: a relaunch may change it (a preempted job requeued onto
# fewer GPUs) as long as the global batch and the lr stay, which keeps every step's images and updates; only the
# BatchNorm batch (per device, or across devices with SyncBatchNorm) then differs, and a warning says so
BATCH_LAYOUT_SETTINGS = frozenset({"num_processes", "per_device_batch_size", "gradient_accumulation_steps", "sync_bn"})
BATCH_SETTINGS = ("global_batch_size", "lr")
# settings (nested keys dotted) an earlier version did not record, each with the option its value comes from: a
# run directory without them resumes, compared without them (they cannot be checked); a streamed part saved before
# its revision was recorded is identified by its row ids (``check_hub_data``)
ADDED_SETTINGS = {
    "backbone_weights_sha256": "--backbone_weights",
    "coco_init_sha256": "--coco_init",
    "data.unlabeled.revision": "--dataset_name",
}


# options that are no setting of the run: how long the processes of a launch wait for each other
UNRECORDED_OPTIONS = frozenset({"collective_timeout_s", "heartbeat_timeout_s"})
SYNTHETIC_PREFIX = "synthetic_"
# an earlier version's names: ``base_lr`` was the --lr option, and ``lr`` the lr used (``scaled_lr`` now)
RENAMED_SETTINGS = {"lr": "scaled_lr", "base_lr": "lr"}
# an earlier version's ``dataset`` was the kind of data where --dataset does not apply (now None there)
EARLIER_DATA_KINDS = (SYNTHETIC, HUB)


def settings_record(config) -> dict:
    """The settings of ``config`` (a :class:`~stpp_hf.training.config.RunConfig`) as ``run_config.json`` holds them:
    every option by its name, the synthetic data's options in a ``synthetic`` section and the ``datasets`` options in
    a ``hub_dataset`` section (each ``None`` where that data is not used, as ``dataset``, the layout, is), and the
    facts that follow from the options (``num_processes``, ``scaled_lr``, the initialisation files' hashes)."""
    hub_names = [option.name for option in fields(HubDataArguments)]
    options = {**asdict(config.data), **asdict(config.model), **asdict(config.run)}
    record = {
        name: value
        for name, value in options.items()
        if name not in UNRECORDED_OPTIONS and name not in hub_names and not name.startswith(SYNTHETIC_PREFIX)
    }
    synthetic = {
        name.removeprefix(SYNTHETIC_PREFIX): value
        for name, value in options.items()
        if name.startswith(SYNTHETIC_PREFIX)
    }
    record["synthetic"] = synthetic if config.is_synthetic else None
    record["hub_dataset"] = {name: options[name] for name in hub_names} if config.is_hub else None
    return {**record, **asdict(config.derived)}


def migrate_record(record: Mapping[str, Any]) -> dict:
    """``record`` in today's names (:data:`RENAMED_SETTINGS`): a record written by an earlier version, where ``lr``
    was the lr used and ``base_lr`` the option, reads as ``scaled_lr`` and ``lr``, and its ``dataset``
    ``"synthetic"`` / ``"hub"`` (the kind of data) as ``None`` (no layout)."""
    if not isinstance(record, Mapping):
        return record  # not a record: the comparison names what is wrong with it
    record = dict(record)
    if "base_lr" in record:
        record = {RENAMED_SETTINGS.get(key, key): value for key, value in record.items()}
    if record.get("dataset") in EARLIER_DATA_KINDS:
        record["dataset"] = None
    return record


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(setting, saved value, new value)]`` of the result-changing settings that differ, nested keys
    dotted (``data.val``). A top-level section that only one side has yet (``data``, known once the
    sources are built) is not compared; :data:`NON_RESULT_SETTINGS` never are, nor the
    :data:`BATCH_LAYOUT_SETTINGS` while the global batch and lr are the same, nor :data:`ADDED_SETTINGS` that
    ``saved`` lacks."""
    saved, new = json.loads(json.dumps(migrate_record(saved))), json.loads(json.dumps(dict(new)))  # tuples as on disk
    for section in set(saved) ^ set(new):
        if isinstance(saved.get(section, new.get(section)), dict):
            saved.pop(section, None), new.pop(section, None)
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    missing = object()
    differences = []
    same_batch = all(flat_saved.get(key, missing) == flat_new.get(key, missing) for key in BATCH_SETTINGS)
    for key in sorted(set(flat_saved) | set(flat_new)):
        if key.split(".")[0] in NON_RESULT_SETTINGS or (same_batch and key in BATCH_LAYOUT_SETTINGS):
            continue
        if key in ADDED_SETTINGS and key not in flat_saved:
            continue
        before, after = flat_saved.get(key, missing), flat_new.get(key, missing)
        if before != after:
            differences.append((key, None if before is missing else before, None if after is missing else after))
    return differences


def check_same_config(run_dir: str | os.PathLike, saved: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Raise a :class:`ConfigError` listing every differing setting (saved -> new) of ``run_dir``."""
    differences = config_differences(saved, new)
    if differences:
        details = "\n".join(
            f"  {key}: {before!r} -> {after!r}" + _what_changed(key, new) for key, before, after in differences
        )
        raise ConfigError(
            f"{run_dir} already holds a run with other settings (saved -> new):\n{details}\n"
            "use another --output_dir, or the saved settings to resume"
        )


def _what_changed(key: str, new: Mapping[str, Any]) -> str:
    """What a differing setting means, where its name alone does not say."""
    if key.endswith("_sha256") and key in ADDED_SETTINGS:
        option = ADDED_SETTINGS[key]
        return f" (the file {new.get(option.removeprefix('--'))} given as {option} has other content than the run's)"
    return ""


def batch_layout_change(saved: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """A warning when the same global batch is laid out otherwise on the hardware (processes, per-device batch,
    accumulation, SyncBatchNorm) than in ``saved``; ``None`` when the layout is the same."""
    if all(saved.get(key) == new.get(key) for key in BATCH_LAYOUT_SETTINGS):
        return None

    def layout(config: Mapping[str, Any]) -> str:
        across = config.get("num_processes", 1) if config.get("sync_bn") else 1
        bn_batch = config.get("per_device_batch_size", 0) * across
        return (
            f"{config.get('per_device_batch_size')} per device x {config.get('num_processes')} processes x "
            f"{config.get('gradient_accumulation_steps')} accumulation steps, BatchNorm batch {bn_batch}"
            + (" (SyncBatchNorm)" if config.get("sync_bn") else "")
        )

    return (
        f"the global batch of {new.get('global_batch_size')} was {layout(saved)} and is now {layout(new)}: the steps "
        "and lr are the same, but BatchNorm normalises over the BatchNorm batch and keeps its running statistics "
        "per process, so the run continues with BatchNorm statistics that differ from an uninterrupted run's"
    )


def check_and_record_run_config(run_dir: str | os.PathLike, record: Mapping[str, Any], write: bool = True) -> None:
    """Compare ``record`` with the run directory's ``run_config.json`` (if any), then (``write``) write it there.

    Call it before anything in ``run_dir`` is made or replaced (with the settings only), and again once
    the sources are built (with their ``data`` section). A run directory from an older version, with
    ``state.json`` but no ``run_config.json``, cannot be checked and is refused.
    """
    layout = RunLayout(run_dir)
    run_dir, path = layout.run_dir, layout.run_config
    if path.is_file():
        try:
            on_disk = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}); restore it or use another --output_dir") from None
        saved = migrate_record(on_disk)
        check_same_config(run_dir, saved, record)
        if write and (change := batch_layout_change(saved, record)):
            logger.warning("%s: %s", run_dir, change)
        merged = {**saved, **record}  # keep the data section of the first check until the second one
    elif layout.state.is_file():
        raise ConfigError(f"{run_dir} holds a run without {path.name} (an older version): use another --output_dir")
    else:
        on_disk, merged = None, dict(record)
    if write and json.loads(json.dumps(merged)) != on_disk:  # an unchanged record is not rewritten
        atomic_write_json(path, merged)
