"""The built-in synthetic segmentation dataset, written in Pascal VOC layout.

Every image shows 2-5 objects of five classes on a cluttered background. Classes are told apart by
shape, colour and texture together, and no single cue suffices:

====  ==========  =====================  ==============================
id    class       shape                  colour / texture
====  ==========  =====================  ==============================
0     background  colour field + clutter small blobs and lines of any hue
1     disc        filled ellipse         warm hues, smooth shading
2     box         rotated rectangle      warm hues (overlapping disc), smooth
3     triangle    triangle               blue hues, stripes
4     ring        annulus                blue hues (overlapping triangle), stripes or plain
5     cross       plus sign              green hues, checkerboard
====  ==========  =====================  ==============================

Objects vary in scale (4x), aspect, rotation, brightness and saturation, overlap each other and
leave the frame; a global illumination gradient, pixel noise and JPEG compression come on top.
Twenty labeled images cover this variation poorly, several hundred unlabeled ones cover it well,
which is what self-training exploits.

Each image is drawn from its own generator seeded by ``(seed, pool, index)``, so the val images do
not change when the train counts do, and the same seed always gives the same bytes. Layout::

    root/JPEGImages/{id}.jpg  root/SegmentationClass/{id}.png (palette PNG, class indices)
    root/splits/{labeled,unlabeled,val}.txt  root/synthetic.json (generation settings, id2label)

    python -m stpp_hf.data.synthetic --output-dir data/synthetic --sample-grid docs/images/synthetic_samples.png
"""

from __future__ import annotations

import argparse
import colorsys
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..file_io import atomic_write_bytes, json_text
from ..models.deeplab.label_presets import PASCAL_VOC_PALETTE, colorize, flat_palette
from .splits import SplitEntry, write_split

SYNTHETIC_ID2LABEL = {0: "background", 1: "disc", 2: "box", 3: "triangle", 4: "ring", 5: "cross"}
INFO_FILE = "synthetic.json"
_POOL_CODES = {"train": 0, "val": 1}

# (hue range, texture choices) per object class; hue in [0, 1)
_CLASS_STYLES = {
    1: ((0.96, 1.10), ("smooth",)),
    2: ((0.02, 0.14), ("smooth",)),
    3: ((0.52, 0.66), ("stripes",)),
    4: ((0.58, 0.72), ("stripes", "plain")),
    5: ((0.24, 0.42), ("checker",)),
}


@dataclass
class SyntheticConfig:
    """Generation settings; stored in ``synthetic.json`` so an unchanged dataset is not rewritten."""

    seed: int = 0
    num_labeled: int = 20
    num_unlabeled: int = 300
    num_val: int = 100
    image_size: int = 96
    min_objects: int = 2
    max_objects: int = 5
    noise_std: float = 8.0
    jpeg_quality: int = 90
    version: int = 1

    def __post_init__(self):
        for name in ("num_labeled", "num_unlabeled", "num_val"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")


@dataclass
class SyntheticDataset:
    """A generated dataset: its root, its split files (``labeled``/``unlabeled``/``val``) and classes."""

    root: Path
    split_files: dict[str, Path]
    id2label: dict[int, str] = field(default_factory=lambda: dict(SYNTHETIC_ID2LABEL))
    palette: list[int] = field(default_factory=lambda: flat_palette(PASCAL_VOC_PALETTE))

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def _hsv_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _object_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]`` footprint of class ``kind`` in object coordinates (unit size)."""
    if kind == 1:
        return u * u + v * v <= 1.0
    if kind == 2:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == 3:
        return (v <= 0.55) & (v >= -1.0 + np.sqrt(3.0) * np.abs(u))
    if kind == 4:
        radius2 = u * u + v * v
        return (radius2 <= 1.0) & (radius2 >= 0.36)
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))


def _texture(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness factor ``[H, W]`` of a texture in object coordinates."""
    if name == "stripes":
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(7, 11)
        return 0.72 + 0.28 * np.sign(np.sin(frequency * (u * np.cos(angle) + v * np.sin(angle))))
    if name == "checker":
        frequency = rng.uniform(5, 8)
        return 0.75 + 0.25 * np.sign(np.sin(frequency * u) * np.sin(frequency * v))
    if name == "smooth":
        return 1.0 - 0.18 * (u + v)
    return np.ones_like(u)


def _background(size: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float background: a two-colour gradient plus low-frequency colour waves."""
    first = _hsv_rgb(rng.uniform(), rng.uniform(0.0, 0.45), rng.uniform(0.35, 0.85))
    second = _hsv_rgb(rng.uniform(), rng.uniform(0.0, 0.45), rng.uniform(0.35, 0.85))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / size + 1) / 2
    image = first * (1 - ramp[..., None]) + second * ramp[..., None]
    for _ in range(2):
        direction, frequency = rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 5) * 2 * np.pi / size
        wave = np.sin(frequency * (xx * np.cos(direction) + yy * np.sin(direction)) + rng.uniform(0, 2 * np.pi))
        image += wave[..., None] * rng.uniform(-25, 25, size=3).astype(np.float32)
    return image


def _add_clutter(image: np.ndarray, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> None:
    """Background-labelled distractors in any hue: small blobs and thin lines (in place)."""
    size = image.shape[0]
    for _ in range(rng.integers(2, 7)):
        colour = _hsv_rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
        cy, cx = rng.uniform(0, size, size=2)
        if rng.uniform() < 0.5:
            radius = rng.uniform(0.02, 0.05) * size
            footprint = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
            angle, half_length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.45) * size
            along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            footprint = (np.abs(across) <= rng.uniform(0.6, 1.6)) & (np.abs(along) <= half_length)
        image[footprint] = colour


def render_sample(config: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image [H, W, 3] uint8, mask [H, W] uint8 class indices)`` pair drawn from ``rng``."""
    size = config.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(size, rng, yy, xx)
    _add_clutter(image, rng, yy, xx)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
        kind = int(rng.integers(1, len(_CLASS_STYLES) + 1))
        (hue_low, hue_high), textures = _CLASS_STYLES[kind]
        scale = rng.uniform(0.1, 0.4) * size
        stretch = rng.uniform(0.75, 1.33)
        angle = rng.uniform(0, 2 * np.pi)
        cy, cx = rng.uniform(-0.05, 1.05, size=2) * size
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / (scale * stretch)
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) * stretch / scale
        footprint = _object_mask(kind, u, v)
        if not footprint.any():
            continue
        colour = _hsv_rgb(rng.uniform(hue_low, hue_high), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
        shading = _texture(str(rng.choice(textures)), u, v, rng)
        image[footprint] = colour * shading[footprint][:, None]
        mask[footprint] = kind
    # illumination: a brightness ramp across the whole scene, then sensor noise
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.45)
    ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / size + 1) / 2
    image *= (1 - strength / 2 + strength * ramp)[..., None] * rng.uniform(0.75, 1.2)
    image += rng.normal(0.0, config.noise_std, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _sample_rng(seed: int, pool: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _POOL_CODES[pool], index])


def _sample_plan(config: SyntheticConfig) -> dict[str, list[tuple[str, str, int]]]:
    """``{part: [(id, pool, index), ...]}``: labeled and unlabeled come from one train pool."""
    train = [(f"train_{index:05d}", "train", index) for index in range(config.num_labeled + config.num_unlabeled)]
    return {
        "labeled": train[: config.num_labeled],
        "unlabeled": train[config.num_labeled :],
        "val": [(f"val_{index:05d}", "val", index) for index in range(config.num_val)],
    }


def _write_dataset(root: Path, config: SyntheticConfig) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    for part, samples in _sample_plan(config).items():
        entries = []
        for sample_id, pool, index in samples:
            image, mask = render_sample(config, _sample_rng(config.seed, pool, index))
            Image.fromarray(image).save(root / "JPEGImages" / f"{sample_id}.jpg", quality=config.jpeg_quality)
            colorize(mask, PASCAL_VOC_PALETTE).save(root / "SegmentationClass" / f"{sample_id}.png")
            entries.append(SplitEntry(f"JPEGImages/{sample_id}.jpg", f"SegmentationClass/{sample_id}.png"))
        write_split(root / "splits" / f"{part}.txt", entries)
    info = {"config": asdict(config), "id2label": {str(k): v for k, v in SYNTHETIC_ID2LABEL.items()}}
    atomic_write_bytes(root / INFO_FILE, json_text(info, str(root / INFO_FILE), indent=2).encode("utf-8"))


def make_synthetic_dataset(output_dir: str | Path, seed: int = 0, **settings) -> SyntheticDataset:
    """Generate the synthetic dataset in ``output_dir`` (Pascal VOC layout) and describe it.

    ``settings`` are :class:`SyntheticConfig` fields (``num_labeled``, ``num_unlabeled``, ``num_val``,
    ``image_size``, ...). A directory already holding the same settings is reused as is; one holding
    another synthetic dataset is replaced; any other non-empty directory is an error. The dataset is
    built in a temporary sibling directory and renamed into place, so a killed run leaves no half.
    """
    config = SyntheticConfig(seed=seed, **settings)
    root = Path(output_dir)
    split_files = {part: root / "splits" / f"{part}.txt" for part in ("labeled", "unlabeled", "val")}
    palette = flat_palette(PASCAL_VOC_PALETTE)
    info_path = root / INFO_FILE
    if info_path.is_file() and json.loads(info_path.read_text(encoding="utf-8")).get("config") == asdict(config):
        return SyntheticDataset(root, split_files, dict(SYNTHETIC_ID2LABEL), palette)
    if root.exists() and any(root.iterdir()) and not info_path.is_file():
        raise FileExistsError(f"{root} is not empty and holds no {INFO_FILE}: refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        _write_dataset(staging / "data", config)
        if root.exists():
            shutil.rmtree(root)
        (staging / "data").rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SyntheticDataset(root, split_files, dict(SYNTHETIC_ID2LABEL), palette)


def save_sample_grid(dataset: SyntheticDataset, path: str | Path, num_samples: int = 8, zoom: int = 2) -> Path:
    """A PNG with ``num_samples`` val images (top row) above their colour-coded masks (bottom row)."""
    from .splits import read_split

    entries = read_split(dataset.split_files["val"])[:num_samples]
    tiles = []
    for entry in entries:
        image = Image.open(dataset.root / entry.image).convert("RGB")
        mask = Image.open(dataset.root / entry.mask).convert("RGB")
        tiles.append((image, mask))
    tile_size = tiles[0][0].width * zoom
    gap = 4
    grid = Image.new("RGB", (len(tiles) * (tile_size + gap) - gap, 2 * tile_size + gap), "white")
    for column, (image, mask) in enumerate(tiles):
        left = column * (tile_size + gap)
        grid.paste(image.resize((tile_size, tile_size), Image.NEAREST), (left, 0))
        grid.paste(mask.resize((tile_size, tile_size), Image.NEAREST), (left, tile_size + gap))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the built-in synthetic dataset (Pascal VOC layout).")
    parser.add_argument("--output-dir", required=True, help="Dataset root to write.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-labeled", type=int, default=SyntheticConfig.num_labeled)
    parser.add_argument("--num-unlabeled", type=int, default=SyntheticConfig.num_unlabeled)
    parser.add_argument("--num-val", type=int, default=SyntheticConfig.num_val)
    parser.add_argument("--image-size", type=int, default=SyntheticConfig.image_size)
    parser.add_argument("--sample-grid", default=None, help="Also write a PNG grid of val images and masks here.")
    args = parser.parse_args(argv)
    dataset = make_synthetic_dataset(
        args.output_dir,
        seed=args.seed,
        num_labeled=args.num_labeled,
        num_unlabeled=args.num_unlabeled,
        num_val=args.num_val,
        image_size=args.image_size,
    )
    print(f"synthetic dataset in {dataset.root}: " + ", ".join(f"{p}={f}" for p, f in dataset.split_files.items()))
    if args.sample_grid:
        print(f"sample grid: {save_sample_grid(dataset, args.sample_grid)}")


if __name__ == "__main__":
    main()
