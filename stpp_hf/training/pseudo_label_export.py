"""A finished run's pseudo labels as a ``datasets.Dataset`` (one row per pseudo-labeled unlabeled image).

Columns: ``id``, ``image`` (the unlabeled image), ``pseudo_label`` (``Image``, class indices with the
data's palette), ``reliability`` (the ST++ selection score, ``None`` for ST), ``subset`` (``reliable`` /
``unreliable`` for ST++, ``all`` for ST) and ``teacher`` (the model that labeled the row, with its
fingerprint). The labels are read from the run's pseudo-label stores, which must be complete (checked
against their manifests); the images come from the run's unlabeled source, recorded by ``train_stpp.py``
in ``unlabeled_source.json``.
"""

from __future__ import annotations

import json
import os

from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature

from ..data import PseudoLabelStore, load_source
from ..file_io import atomic_write_json
from .results import RunResults, StageSummary
from .run_layout import RunLayout, StageLayout
from .stages import build_stages

PSEUDO_LABEL_FEATURES = Features(
    {
        "id": Value("string"),
        "image": ImageFeature(),
        "pseudo_label": ImageFeature(),
        "reliability": Value("float64"),
        "subset": Value("string"),
        "teacher": Value("string"),
    }
)


def record_unlabeled_source(run_dir: str | os.PathLike, description: dict) -> None:
    """Write how to load the run's unlabeled images again: ``{"kind": "local", "source", "root", "split_file"}``
    or ``{"kind": "hub", "dataset_name", ...}`` (the options of :func:`~stpp_hf.data.hub.loading.load_hub_sources`)."""
    atomic_write_json(RunLayout(run_dir).unlabeled_source, description)


def load_unlabeled_source(run_dir: str | os.PathLike) -> Dataset:
    """The unlabeled ``datasets.Dataset`` (``id``, ``image``, ``label``) of the run in ``run_dir``."""
    layout = RunLayout(run_dir)
    path = layout.unlabeled_source
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it names the run's unlabeled images (train_stpp.py writes it)")
    description = json.loads(path.read_text(encoding="utf-8"))
    if description["kind"] == "local":
        return load_source(
            description["source"], description["root"], description["split_file"], cache_dir=layout.datasets_cache
        )
    from ..data.hub.loading import load_hub_sources

    options = {
        key: value
        for key, value in description.items()
        if key not in ("kind", "dataset_name", "id2label", "streaming")
    }
    return load_hub_sources(
        description["dataset_name"], layout.partition, id2label_file=description.get("id2label"), **options
    ).unlabeled


def label_stages(results: RunResults, layout: RunLayout) -> list[tuple[StageSummary, StageLayout]]:
    """The select and label stages of a run's results with their stage directories."""
    stages = build_stages(results.framework)
    return [
        (entry, layout.stage(index, stage))
        for index, (stage, entry) in enumerate(zip(stages, results.stages))
        if entry.kind in ("label", "select")
    ]


def pseudo_label_dataset(run_dir: str | os.PathLike, unlabeled: Dataset | None = None) -> Dataset:
    """The pseudo labels of the finished run in ``run_dir`` as a ``datasets.Dataset`` (columns above).

    Args:
        run_dir: a finished run directory (``results.json``, ``pseudo_labels/``).
        unlabeled: the run's unlabeled ``datasets.Dataset`` (default: :func:`load_unlabeled_source`).

    Rows follow the unlabeled set's order. A store that lacks a label or holds a corrupt one is an error
    naming the ids.
    """
    layout = RunLayout(run_dir)
    results = RunResults.read(run_dir)
    unlabeled = load_unlabeled_source(run_dir) if unlabeled is None else unlabeled
    reliability: dict[str, float] = {}
    label_of: dict[str, tuple[PseudoLabelStore, str, str]] = {}
    for stage, stage_files in label_stages(results, layout):
        if stage.kind == "select":
            reliability = json.loads(stage_files.reliability_scores.read_text(encoding="utf-8"))
            continue
        store = PseudoLabelStore(layout.run_dir / stage.store_dir)
        ids = list(store.entries())
        broken = store.pending(ids)
        if broken or len(ids) != stage.num_images:
            raise ValueError(
                f"pseudo-label store {store.directory} holds {len(ids) - len(broken)} intact labels, stage "
                f"{stage.name!r} wrote {stage.num_images} (unusable: {broken[:5]})"
            )
        teacher = f"{stage.teacher} (sha256 {store.fingerprint[:16]})"
        for image_id in ids:
            label_of[image_id] = (store, stage.subset, teacher)
    ids = list(unlabeled["id"])
    missing = sorted(set(label_of) - set(ids))
    if missing:
        raise ValueError(
            f"{layout.run_dir}: pseudo labels of ids that are not in the unlabeled set, e.g. {missing[:3]}"
        )
    positions = [position for position, image_id in enumerate(ids) if image_id in label_of]
    rows = unlabeled.select(positions).select_columns(["id", "image"])
    kept = [ids[position] for position in positions]
    labels = [{"path": str(label_of[i][0].directory / PseudoLabelStore.file_name(i)), "bytes": None} for i in kept]
    rows = rows.add_column("pseudo_label", labels, feature=ImageFeature())
    rows = rows.add_column("reliability", [reliability.get(i) for i in kept], feature=Value("float64"))
    rows = rows.add_column("subset", [label_of[i][1] for i in kept], feature=Value("string"))
    rows = rows.add_column("teacher", [label_of[i][2] for i in kept], feature=Value("string"))
    return rows.cast(PSEUDO_LABEL_FEATURES)
