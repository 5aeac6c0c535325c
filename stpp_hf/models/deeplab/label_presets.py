"""Class names and colour palettes of the datasets the method is evaluated on, and `colorize`.

Kept free of package-absolute imports: this file travels with saved models as remote code.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

IGNORE_INDEX = 255

PASCAL_VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# Colours of the 19 Cityscapes train ids, in train-id order (cityscapesscripts' labels table).
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


def pascal_voc_palette(num_colors: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map: the bits of each class index are spread over the high bits of R, G and B."""
    colors = []
    for index in range(num_colors):
        red = green = blue = 0
        code = index
        for shift in range(7, -1, -1):
            red |= ((code >> 0) & 1) << shift
            green |= ((code >> 1) & 1) << shift
            blue |= ((code >> 2) & 1) << shift
            code >>= 3
        colors.append((red, green, blue))
    return tuple(colors)


PASCAL_VOC_PALETTE = pascal_voc_palette()


@dataclass(frozen=True)
class LabelPreset:
    """Class names (index = class id) and one RGB colour per class (the ignore index may have one too)."""

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


LABEL_PRESETS = {
    "pascal_voc": LabelPreset(PASCAL_VOC_CLASSES, PASCAL_VOC_PALETTE),
    "cityscapes": LabelPreset(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
}


def get_label_preset(name: str) -> LabelPreset:
    """Look up a preset by name (`"pascal_voc"` or `"cityscapes"`)."""
    if name not in LABEL_PRESETS:
        raise ValueError(f"Unknown label preset {name!r}; allowed values: {sorted(LABEL_PRESETS)}")
    return LABEL_PRESETS[name]


def _colors(palette: Sequence[Sequence[int]] | Sequence[int] | str) -> np.ndarray:
    """`[N, 3]` RGB rows of a palette given as RGB triplets, PIL's flat `[r, g, b, ...]` list or a preset name."""
    if isinstance(palette, str):
        palette = get_label_preset(palette).palette
    error = ValueError("palette must hold 1 to 256 RGB triplets with values in 0..255")
    try:
        colors = np.asarray(palette)
    except ValueError:  # rows of different lengths
        raise error from None
    if colors.ndim == 1 and colors.size % 3 == 0:
        colors = colors.reshape(-1, 3)
    if colors.ndim != 2 or colors.shape[1] != 3 or not 1 <= len(colors) <= 256:
        raise error
    if not np.isin(colors, range(256)).all():
        raise error
    return colors


def flat_palette(palette: Sequence[Sequence[int]] | Sequence[int] | str) -> list[int]:
    """A palette (RGB triplets, a flat list or a preset name) as PIL's flat 768-value list; unused entries are
    black."""
    flat = _colors(palette).ravel().tolist()
    return flat + [0] * (768 - len(flat))


def colorize(label_map, palette: Sequence[Sequence[int]] | Sequence[int] | str | None) -> Image.Image:
    """Turn a class-index map into a palette ("P" mode) PIL image.

    Args:
        label_map (integer array-like of shape `(height, width)`): a numpy array, torch tensor or PIL "L" / "P" image
            holding class ids in `[0, len(palette))` or the ignore index 255.
        palette: a sequence of RGB triplets (index = class id), PIL's flat `[r, g, b, ...]` list, a preset name
            ("pascal_voc", "cityscapes"), or None for a grey ("L" mode) image of the class ids.

    Returns:
        A "P" ("L" without palette) mode image: shows the colours, and saved as PNG it keeps the class ids as
        pixel values.
    """
    if hasattr(label_map, "detach"):
        label_map = label_map.detach().cpu().numpy()
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label_map must be 2-D [H, W], got shape {tuple(label_map.shape)}")
    if label_map.dtype.kind not in "iub":
        raise ValueError(f"label_map must hold integer class ids, got dtype {label_map.dtype}")
    num_colors = 256 if palette is None else len(_colors(palette))
    invalid = (label_map < 0) | ((label_map >= num_colors) & (label_map != IGNORE_INDEX))
    if invalid.any():
        bad_values = np.unique(label_map[invalid])[:10].tolist()
        raise ValueError(
            f"label_map holds values {bad_values} outside the palette's {num_colors} classes "
            f"(and ignore index {IGNORE_INDEX})"
        )
    height, width = label_map.shape
    pixels = np.ascontiguousarray(label_map, dtype=np.uint8).tobytes()
    if palette is None:
        return Image.frombytes("L", (width, height), pixels)
    image = Image.frombytes("P", (width, height), pixels)
    image.putpalette(flat_palette(palette))
    return image
