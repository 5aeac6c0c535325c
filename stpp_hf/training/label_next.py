"""Which unlabeled images to annotate next: an aid built on the ST++ selection, not part of the method.

The select stage scores every unlabeled image by how much the SupOnly checkpoints agree on it
(:mod:`~stpp_hf.training.selection`); the images they disagree on most are where the labeled set says least. The
``K`` least reliable images are written as ``label_next.csv`` (rank, id, image, reliability) and as a contact sheet
``label_next.png`` of each image next to the SupOnly model's prediction. Nothing of the run reads them back.
"""

from __future__ import annotations

import csv
import io
from typing import Mapping, Sequence

from ..file_io import atomic_write_text

DEFAULT_LABEL_NEXT = 16  # images in label_next.csv / .png (0: none)
CSV_FIELDS = ("rank", "id", "image", "reliability")


def least_reliable(scores: Mapping[str, float], ids: Sequence[str], count: int) -> list[str]:
    """The ``count`` last images of the selection's ranking (``ids`` by score, highest first, stable), last first."""
    ranked = sorted(ids, key=lambda image_id: scores[image_id], reverse=True)
    return ranked[::-1][:count]


def label_next_rows(scores: Mapping[str, float], ids: Sequence[str], images: Mapping[str, str], count: int) -> list:
    """``[{"id", "image", "reliability"}]`` of the :func:`least_reliable` images (``images``: id -> image path)."""
    return [
        {"id": image_id, "image": images[image_id], "reliability": scores[image_id]}
        for image_id in least_reliable(scores, ids, count)
    ]


def write_label_next_csv(path, rows: Sequence[Mapping]) -> None:
    """``label_next.csv``: one line per image, rank 1 the least reliable."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for rank, row in enumerate(rows, start=1):
        writer.writerow([rank, row["id"], row["image"], repr(float(row["reliability"]))])
    atomic_write_text(path, buffer.getvalue())


def read_label_next_csv(path) -> list[dict]:
    """The rows of a ``label_next.csv`` (``rank`` and ``reliability`` as numbers)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            {**row, "rank": int(row["rank"]), "reliability": float(row["reliability"])}
            for row in csv.DictReader(handle)
        ]
