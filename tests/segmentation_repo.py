"""A small segmentation dataset repo as Hub datasets ship them: parquet splits with Image features and
id2label.json."""

import io
import json
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

CLASS_NAMES = ("background", "disc", "bar")


def png_field(image: Image.Image) -> dict:
    """An Image-feature value holding ``image`` as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _sample(rng: np.random.Generator, size: tuple[int, int], palette: bool) -> tuple[dict, dict]:
    """An image whose bright pixels are class 1 and dark ones class 2, and its class-index mask."""
    width, height = size
    mask = rng.integers(0, len(CLASS_NAMES), size=(height, width), dtype=np.uint8)
    pixels = np.stack([mask * 100 + rng.integers(0, 30, size=mask.shape, dtype=np.uint8)] * 3, axis=-1).astype(
        np.uint8
    )
    label = Image.fromarray(mask)
    if palette:
        label.putpalette([0, 0, 0, 200, 30, 30, 30, 30, 200])
    return png_field(Image.fromarray(pixels)), png_field(label)


def segmentation_repo_files(
    num_train: int = 24, num_val: int = 6, size: tuple[int, int] = (12, 10), unlabeled_rows: tuple[int, ...] = (3, 7),
    label_column: str = "annotation", seed: int = 0, with_id2label: bool = True, extra: dict | None = None,
) -> dict[str, bytes]:  # fmt: skip
    """``{path in repo: bytes}``: ``data/{train,validation}-00000-of-00001.parquet`` (columns ``image``,
    ``label_column``, ``caption``) and ``id2label.json``; train rows in ``unlabeled_rows`` have no label.
    ``extra`` maps row index -> {column: value} overrides of the train split (to plant bad rows)."""
    rng = np.random.default_rng(seed)
    features = Features({"image": ImageFeature(), label_column: ImageFeature(), "caption": Value("string")})
    files = {}
    for split, count in (("train", num_train), ("validation", num_val)):
        rows = {"image": [], label_column: [], "caption": []}
        for index in range(count):
            image, label = _sample(rng, size, palette=True)
            if split == "train" and index in unlabeled_rows:
                label = None
            overrides = (extra or {}).get(index, {}) if split == "train" else {}
            rows["image"].append(overrides.get("image", image))
            rows[label_column].append(overrides.get(label_column, label))
            rows["caption"].append(f"{split} {index}")
        buffer = io.BytesIO()
        Dataset.from_dict(rows, features=features).to_parquet(buffer)
        files[f"data/{split}-00000-of-00001.parquet"] = buffer.getvalue()
    if with_id2label:
        files["id2label.json"] = json.dumps({str(index): name for index, name in enumerate(CLASS_NAMES)}).encode()
    return files


def write_repo(directory: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
    return directory
