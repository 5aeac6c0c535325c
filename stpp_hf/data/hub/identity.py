"""What the rows of a ``datasets`` run are, for ``run_config.json``'s ``data`` section: public facts only.

An in-memory part is its content: a SHA-256 over each row's id and the SHA-256 of its stored (encoded) image and
label bytes, so the record is the same in a new process or with a new cache directory and changes with any row's
content. A streamed unlabeled part is not read before the stages: it is its dataset, configuration, split and row
ids (:attr:`~stpp_hf.data.streamed.UnlabeledStream.identity` and ``ids``) and the dataset's revision
(:func:`dataset_revision`), so that a new commit of a streamed dataset is not mixed into a resumed run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import datasets
import huggingface_hub
from datasets import Dataset

from ...file_io import sha256_file, sha256_json
from ..images import undecoded
from ..streamed import UnlabeledStream


def rows_record(rows: Dataset, ids: Sequence[str], columns: tuple[str, str]) -> dict:
    """``{"content_sha256", "num_images"}`` of ``rows`` (image and label ``columns``), named ``ids``."""
    digest = hashlib.sha256()
    for image_id, row in zip(ids, undecoded(rows.select_columns(list(columns)), columns)):
        line = [image_id, *(_value_sha256(row[column]) for column in columns)]
        digest.update(json.dumps(line).encode("utf-8") + b"\n")
    return {"content_sha256": digest.hexdigest(), "num_images": len(ids)}


def stream_record(stream: UnlabeledStream, revision: str | None) -> dict:
    """``{"ids_sha256", "num_images", "revision"}`` of a streamed part: its dataset, configuration, split and row
    ids, and the dataset's ``revision``."""
    ids_sha256 = sha256_json({**stream.identity, "ids": stream.ids})
    return {"ids_sha256": ids_sha256, "num_images": len(stream), "revision": revision}


def dataset_revision(dataset_name: str) -> str | None:
    """The commit sha of the Hub dataset ``dataset_name``'s default branch; ``None`` for a local directory or file
    (asked nothing) and in offline mode."""
    if Path(dataset_name).exists() or huggingface_hub.is_offline_mode() or datasets.config.HF_HUB_OFFLINE:
        # offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE), the Hub cannot be asked; in-memory parts are identified by
        # content anyway
        return None
    return huggingface_hub.HfApi().dataset_info(dataset_name).sha


def _value_sha256(value: dict | None) -> str | None:
    """The SHA-256 of a ``datasets`` image value's encoded bytes (read from its file when it holds a path)."""
    if value is None:
        return None
    if value.get("bytes") is not None:
        return hashlib.sha256(value["bytes"]).hexdigest()
    return sha256_file(Path(value["path"]))
