"""Reading images and masks the way the method does, in one place for sources, training items, evaluation and
``examples/infer.py``.

* **Stored pixels.** An image is used as its file stores it: an EXIF orientation tag is ignored, as in the
  reference implementation (``PIL.Image.open``). Masks are read the same way, so an image and its mask align
  whenever the mask was drawn on the stored pixels. ``datasets``' ``Image`` feature applies the tag to what it
  decodes (to the image but, having none, not to its PNG mask), so the training sets read their rows through
  :func:`undecoded` and decode them with :func:`open_image`. ``infer.py`` writes its masks in the stored
  orientation too and copies the photo's tag onto them (:func:`with_orientation`), so an EXIF-aware viewer
  turns photo and mask alike.
* **8-bit RGB.** :func:`rgb_image` gives the model's input image. 16-bit and float images (modes ``I;16*``,
  ``I``, ``F``: microscopy, thermal, depth) are stretched per image from their own minimum..maximum to 0..255
  (a 12-bit sensor in a 16-bit file would be almost black if divided by 257, and PIL's own conversion clips
  every value above 255 to white); non-finite values become 0.
* **Decompression-bomb limit.** PIL refuses images over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels; the error
  names the file and the limit. Raise it with ``PIL.Image.MAX_IMAGE_PIXELS = n`` in Python or, for the
  command-line scripts and their DataLoader workers, the environment variable ``STPP_MAX_IMAGE_PIXELS=n``
  (``0``: no limit).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

MAX_PIXELS_VARIABLE = "STPP_MAX_IMAGE_PIXELS"
HIGH_DEPTH_MODES = ("I", "F")  # and every "I;16..." mode
ORIENTATION_TAG = ExifTags.Base.Orientation
MASK_MODES = ("L", "P")  # a mask holds class indices in one 8-bit channel
# suffixes (any case) of the files the folder source and examples/infer.py take as images
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

if os.environ.get(MAX_PIXELS_VARIABLE):
    Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS_VARIABLE]) or None


def _describe(source: str | os.PathLike | dict, what: str) -> str:
    if isinstance(source, dict):
        return f"{what} {source['path']}" if source.get("path") else f"{what} (embedded bytes)"
    return f"{what} {source}"


def open_image(source: str | os.PathLike | dict, what: str = "image") -> Image.Image:
    """Open and fully decode an image file as stored (no EXIF rotation); errors name the file.

    Args:
        source: a path, or a ``datasets`` image value ``{"path", "bytes"}`` (bytes win when present).
        what: the file's role in messages (``"image"``, ``"mask"``).
    """
    name = _describe(source, what)
    if isinstance(source, dict):
        if source.get("bytes") is None and not source.get("path"):
            raise ValueError(f"{what}: a datasets image value needs 'path' or 'bytes', got {source}")
        source = io.BytesIO(source["bytes"]) if source.get("bytes") is not None else source["path"]
    try:
        image = Image.open(source)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} does not exist") from None
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{name} is over PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} pixels ({error}); if the "
            f"file is trusted, raise the limit: PIL.Image.MAX_IMAGE_PIXELS = n in Python, or the environment variable "
            f"{MAX_PIXELS_VARIABLE}=n (0 for no limit) for the scripts, or downscale the image"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot decode {name}: {error}") from error
    return image


def rgb_image(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image the model sees: as is when RGB, PIL's conversion for 8-bit modes, and 16-bit or
    float images stretched from their own minimum..maximum to 0..255 (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_DEPTH_MODES or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(values)
        low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
        scale = 255 / (high - low) if high > low else 0.0
        grey = np.where(finite, np.rint((values - low) * scale), 0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1, upright, when there is none)."""
    return int(image.getexif().get(ORIENTATION_TAG, 1))


def with_orientation(orientation: int) -> Image.Exif:
    """An EXIF block holding only ``orientation``: pass it as ``save(..., exif=...)`` to an output that
    must turn with its photo in EXIF-aware viewers."""
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION_TAG] = orientation
    return exif


def swaps_sides(orientation: int) -> bool:
    """Whether an EXIF orientation turns the picture by 90 or 270 degrees (5 to 8)."""
    return orientation in (5, 6, 7, 8)


def undecoded(dataset, columns: tuple[str, ...] = ("image", "label")):
    """``dataset`` (``datasets.Dataset`` or ``IterableDataset``) with its image columns as ``{"path", "bytes"}``
    values, to be read with :func:`open_image` instead of ``datasets``' decoding (which applies EXIF tags)."""
    from datasets import Image as ImageFeature

    for column in columns:
        feature = dataset.features.get(column) if dataset.features is not None else None
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def resolved_path(value: dict | None) -> str | None:
    """The real path of a ``datasets`` image value that refers to a local file (``None`` for embedded bytes)."""
    if value is None or value.get("bytes") is not None or not value.get("path"):
        return None
    return os.path.realpath(Path(value["path"]))


def lossy_format(path: str | os.PathLike) -> str | None:
    """``"JPEG"`` or ``"lossy WebP"`` when the file at ``path`` is encoded lossily (by its bytes, whatever its
    extension), else ``None``. Lossy coding blends neighbouring class ids at region edges: no use for masks."""
    with open(path, "rb") as stream:
        head = stream.read(12)
        if head[:3] == b"\xff\xd8\xff":
            return "JPEG"
        if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
            return None
        while len(chunk := stream.read(8)) == 8:  # VP8X files list their chunks; the first image chunk decides
            fourcc, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if fourcc in (b"VP8 ", b"VP8L"):
                return "lossy WebP" if fourcc == b"VP8 " else None
            stream.seek(size + size % 2, os.SEEK_CUR)
    return None


def check_lossless_mask(path: str | os.PathLike) -> None:
    """Refuse a mask file encoded lossily (see :func:`lossy_format`), naming it."""
    lossy = lossy_format(path)
    if lossy is not None:
        raise ValueError(
            f"mask {path} is a {lossy} file; lossy coding changes class ids at region edges: export masks as PNG"
        )
