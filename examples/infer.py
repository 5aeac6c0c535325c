"""Segment images with a trained model: colour masks, overlays and per-image class areas.

    python examples/infer.py --model runs/stpp/final --images photos/ --output-dir masks/
    python examples/infer.py --model you/deeplabv3plus-stpp-pascal --images a.jpg b.jpg --output-dir masks/ --tta

`--model` is a `save_pretrained` directory or a Hub repo id. For each image `<stem>.<ext>` the output directory
gets `<stem>_mask.png` (palette PNG: shows the class colours, its pixel values are the class ids) and
`<stem>_overlay.png` (the image blended with the colours); `class_areas.json` holds every image's class areas,
which are also printed.

Images are read as the model was trained: the pixels as stored, an EXIF orientation tag ignored, 16-bit images
stretched to 8-bit (stpp_hf.data.images). Mask and overlay are in the stored orientation too, so mask pixel (x, y)
labels photo pixel (x, y) as a program reads them, and carry the photo's orientation tag, so an EXIF-aware viewer
turns them as it turns the photo.
"""

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import stpp_hf  # noqa: F401  (registers the models with the Auto classes, so no remote code is needed)
from stpp_hf.data.images import IMAGE_EXTENSIONS, exif_orientation, open_image, rgb_image, with_orientation
from stpp_hf.models import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, PASCAL_VOC_PALETTE, colorize
from stpp_hf.models.deeplab.deeplab_common import default_window_stride
from stpp_hf.progress import progress_bar

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "name" or "namespace/name"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="save_pretrained directory or Hub repo id.")
    parser.add_argument("--revision", default=None, help="Hub branch / tag / commit (e.g. stage-1-suponly).")
    parser.add_argument(
        "--images", required=True, nargs="+", help="Image files and/or directories (searched recursively)."
    )
    parser.add_argument("--output-dir", required=True)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tta", action="store_true", help="Multi-scale (0.5-2.0) + flip test-time augmentation.")
    mode.add_argument("--sliding-window", action="store_true", help="Predict window by window (large images).")
    parser.add_argument("--window-size", type=int, default=769, help="Sliding window side in pixels.")
    parser.add_argument("--stride", type=int, default=None, help="Sliding window stride (default 2/3 of the window).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--batch-size", type=int, default=4, help="Images per forward pass (same-size images batch together)."
    )
    parser.add_argument("--overlay-alpha", type=float, default=0.5, help="Weight of the mask colours in the overlay.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Use the repo's code instead of stpp_hf's.")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0.0 <= args.overlay_alpha <= 1.0:
        parser.error("--overlay-alpha must be in [0, 1]")
    return args


def check_model_path(model: str) -> None:
    """Refuse at once a `--model` that reads as a local path (starts with `.`, `/` or `~`, or holds a path
    separator without being a `namespace/name` Hub id) but does not exist, which the Hub would otherwise
    be asked for."""
    looks_local = model.startswith((".", "/", "~")) or (os.sep in model and not HUB_REPO_ID.match(model))
    if looks_local and not Path(model).expanduser().exists():
        raise FileNotFoundError(
            f"--model {model}: no such directory (a local path; a Hub model is named 'namespace/name'). "
            "Give the save_pretrained directory of a run, e.g. runs/stpp/final"
        )


def collect_images(paths: list[str], exclude: str | os.PathLike | None = None) -> list[Path]:
    """The image files named by `paths` (files, or directories searched recursively), in a stable order.

    Directory searches skip `exclude` (the output directory, whose masks would otherwise be segmented
    by the next run)."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    images = []
    for raw_path in paths:
        path = Path(raw_path)
        if path.is_dir():
            found = sorted(
                file
                for file in path.rglob("*")
                if file.is_file()
                and file.suffix.lower() in IMAGE_EXTENSIONS
                and (excluded is None or not file.resolve().is_relative_to(excluded))
            )
            if not found:
                skipped = f" outside the output directory {excluded}" if excluded is not None else ""
                raise FileNotFoundError(
                    f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}){skipped} in directory {path}"
                )
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"image path {path} does not exist")
    by_stem = defaultdict(list)
    for image in images:
        by_stem[image.stem].append(image)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        stem, clashing = next(iter(clashes.items()))
        raise ValueError(f"images {[str(path) for path in clashing]} would write the same outputs ({stem}_mask.png)")
    return images


def image_size(path: Path) -> tuple[int, int]:
    """`(width, height)` of the stored pixels of an image, from its header (nothing is decoded)."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def read_image(path: Path) -> tuple[Image.Image, int]:
    """The stored pixels of `path` as 8-bit RGB, and its EXIF orientation (1: none) for the outputs."""
    image = open_image(path)
    return rgb_image(image), exif_orientation(image)


def batches_by_size(images: list[Path], batch_size: int) -> list[list[Path]]:
    """Group the images into batches of one size each (the processor does not resize), reading only their
    headers: a batch is decoded when its turn comes, so memory holds one batch of pixels, not the folder."""
    by_size = defaultdict(list)
    for path in images:
        by_size[image_size(path)].append(path)
    return [
        group[start : start + batch_size] for group in by_size.values() for start in range(0, len(group), batch_size)
    ]


def class_palette(id2label: dict[int, str]) -> tuple[tuple[int, int, int], ...]:
    """Cityscapes colours for Cityscapes classes, else the Pascal VOC colour map (distinct colours for 256 ids)."""
    names = tuple(id2label[index] for index in sorted(id2label))
    if names == CITYSCAPES_CLASSES:
        return CITYSCAPES_PALETTE
    if len(names) > 255:
        raise ValueError(f"the model has {len(names)} classes; masks are palette PNGs with at most 255 classes")
    return PASCAL_VOC_PALETTE[: len(names)]


def predict(model, pixel_values: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """[B, 3, H, W] normalised images -> [B, H, W] class ids."""
    if args.tta:
        scores = model.predict_tta(pixel_values)
    elif args.sliding_window:
        scores = model.predict_sliding_window(
            pixel_values, args.window_size, args.stride or default_window_stride(args.window_size)
        )
    else:
        scores = model(pixel_values=pixel_values).logits
    return scores.float().argmax(dim=1)


def main(argv=None) -> dict[str, dict[str, float]]:
    """Run the command line; returns {image path: {class name: fraction of the image}}."""
    args = parse_args(argv)
    check_model_path(args.model)
    images = collect_images(args.images, exclude=args.output_dir)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    load_options = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model, dtype=dtype, **load_options)
    model = model.to(args.device).eval()
    processor = AutoImageProcessor.from_pretrained(args.model, **load_options)
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    palette = class_palette(id2label)

    areas = {}
    batches = batches_by_size(images, args.batch_size)
    with progress_bar(total=len(images), desc="segmenting", unit="image") as progress:
        for paths in batches:
            batch = [(path, *read_image(path)) for path in paths]
            pixel_values = processor(images=[image for _, image, _ in batch], return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                label_maps = predict(model, pixel_values.to(args.device, dtype), args).cpu()
            for (path, image, orientation), label_map in zip(batch, label_maps):
                mask = colorize(label_map, palette)
                mask.save(output_dir / f"{path.stem}_mask.png", exif=with_orientation(orientation))
                overlay = Image.blend(image, mask.convert("RGB"), args.overlay_alpha)
                overlay.save(output_dir / f"{path.stem}_overlay.png", exif=with_orientation(orientation))
                fractions = torch.bincount(label_map.flatten(), minlength=len(id2label)).double() / label_map.numel()
                image_areas = {
                    id2label[index]: round(float(fraction), 6)
                    for index, fraction in enumerate(fractions)
                    if fraction > 0
                }
                areas[str(path)] = image_areas
                ranked = sorted(image_areas.items(), key=lambda item: -item[1])
                progress.write(f"{path}: " + ", ".join(f"{name} {100 * fraction:.1f}%" for name, fraction in ranked))
                progress.update(1)
    (output_dir / "class_areas.json").write_text(json.dumps(areas, indent=2))
    return areas


if __name__ == "__main__":
    main()
