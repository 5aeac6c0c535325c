"""Data that looks valid but is not, and EXIF orientation: each case is used correctly or
refused with an error that names the file and says what to do."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from fake_hub import save_tiny_model
from PIL import Image, features

from stpp_hf import DeepLabImageProcessor
from stpp_hf.data import (
    EvalDataset,
    PseudoLabelStore,
    RetrainDataset,
    SupOnlyDataset,
    TrainTransform,
    check_label_file_names,
    check_split_overlap,
    load_source,
    read_split,
    write_split,
)
from stpp_hf.data.images import rgb_image
from stpp_hf.data.splits import SplitEntry, parse_split

SIZE = (40, 30)  # width x height, not square: a 90-degree tag swaps the sides
CLASSES = {"0": "background", "1": "thing", "2": "other"}


class Recording:
    """A transform that hands back what the training set read: ``(image array, mask array | None)``."""

    def __call__(self, image, mask):
        return np.asarray(image), None if mask is None else np.asarray(mask)


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _pixels(seed=0, size=SIZE):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _mask(size=SIZE):
    """Class 1 on the left quarter, 2 on the top rows: any turn or flip moves them."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, : size[0] // 4] = 1
    mask[:3] = 2
    return mask


def _stored(path):
    """The stored pixels of an image file, as PIL reads them without looking at EXIF."""
    return np.asarray(Image.open(path).convert("RGB"))


def _layout(root, kind, names, orientation=1, masks=True):
    """Images (JPEG, with an EXIF orientation tag unless 1) and stored-orientation masks in a pascal or folder
    layout; returns ``(load_source arguments, image paths)``."""
    image_dir, mask_dir = ("JPEGImages", "SegmentationClass") if kind == "pascal" else ("images", "masks")
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    lines, paths = [], []
    for index, name in enumerate(names):
        path = root / image_dir / f"{name}.jpg"
        Image.fromarray(_pixels(index)).save(
            path, quality=95, **({"exif": _exif(orientation)} if orientation != 1 else {})
        )
        if masks:
            Image.fromarray(_mask()).save(root / mask_dir / f"{name}.png")
        lines.append(f"{image_dir}/{name}.jpg" + (f" {mask_dir}/{name}.png" if masks else ""))
        paths.append(path)
    if kind == "folder":
        (root / "id2label.json").write_text(json.dumps(CLASSES))
        return ("folder", root), paths
    split = root / f"split-{names[0]}.txt"
    split.write_text("\n".join(lines) + "\n")
    return ("pascal", root, split), paths


# ---- EXIF orientation: stored pixels everywhere -------------------------------------------------


@pytest.mark.parametrize("orientation", [3, 6], ids=["180", "90"])
@pytest.mark.parametrize("kind", ["pascal", "folder"])
def test_exif_tagged_images_are_read_as_stored_with_their_masks(tmp_path, kind, orientation):
    args, paths = _layout(tmp_path / "data", kind, ["a", "b"], orientation)
    labeled = load_source(*args, cache_dir=tmp_path / "cache")
    for dataset in (SupOnlyDataset(labeled, Recording()), EvalDataset(labeled, Recording())):
        for index, path in enumerate(paths):
            image, mask = dataset[index]
            assert np.array_equal(image, _stored(path)) and np.array_equal(mask, _mask())
    # the method's own transforms: a 90-degree tag used to fail on the size check here
    pixels, labels = EvalDataset(labeled)[0]
    assert pixels.shape[1:] == labels.shape == (SIZE[1], SIZE[0]) and torch.equal(
        labels, torch.from_numpy(_mask()).long()
    )
    crops = SupOnlyDataset(labeled, TrainTransform(base_size=40, crop_size=24))
    assert crops[0][0].shape == (3, 24, 24) and crops[0][1].shape == (24, 24)


def test_exif_tagged_unlabeled_images_are_pseudo_labeled_as_stored(tmp_path):
    labeled_args, _ = _layout(tmp_path / "data", "pascal", ["a"])
    unlabeled_args, paths = _layout(tmp_path / "data", "pascal", ["u"], orientation=6, masks=False)
    labeled, unlabeled = (load_source(*args, cache_dir=tmp_path / "cache") for args in (labeled_args, unlabeled_args))
    store = PseudoLabelStore(tmp_path / "store")
    store.put("u", _mask())
    dataset = RetrainDataset(labeled, unlabeled, [(["u"], store)], Recording(), Recording())
    image, mask = dataset[len(dataset) - 1]
    assert np.array_equal(image, _stored(paths[0])) and np.array_equal(mask, _mask())


def test_mask_drawn_on_the_turned_view_is_explained(tmp_path):
    args, _ = _layout(tmp_path, "pascal", ["a"], orientation=6)
    Image.fromarray(np.ascontiguousarray(_mask().T)).save(tmp_path / "SegmentationClass" / "a.png")
    with pytest.raises(
        ValueError, match=r"a\.jpg is 40x30 but its mask .*a\.png is 30x40\. The image carries EXIF orientation 6"
    ):
        load_source(*args, cache_dir=tmp_path / "cache")


# ---- masks: binary 0/255 exports, lossy formats, other extensions --------------------------------


def _pascal_masks(root, masks):
    lines = []
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    for index, mask in enumerate(masks):
        Image.fromarray(_pixels(index)).save(root / "JPEGImages" / f"{index}.png")
        Image.fromarray(mask).save(root / "SegmentationClass" / f"{index}.png")
        lines.append(f"JPEGImages/{index}.png SegmentationClass/{index}.png")
    (root / "split.txt").write_text("\n".join(lines))
    return root / "split.txt"


def test_a_set_of_binary_0_255_masks_is_refused(tmp_path):
    binary = np.where(_mask() > 0, 255, 0).astype(np.uint8)
    split = _pascal_masks(tmp_path / "bad", [binary, np.zeros_like(binary), binary])
    with pytest.raises(
        ValueError,
        match=r"split\.txt: every mask holds only the values 0 and 255 \(e\.g\. .*0\.png\).*mask\[mask == 255\] = 1",
    ):
        load_source("pascal", tmp_path / "bad", split, cache_dir=tmp_path / "cache")
    # one image of background and ignore among ordinary masks is legitimate
    split = _pascal_masks(tmp_path / "good", [binary, _mask()])
    assert len(load_source("pascal", tmp_path / "good", split, cache_dir=tmp_path / "cache")) == 2


def test_folder_masks_of_any_lossless_extension_match_and_strays_are_reported(tmp_path, caplog):
    _layout(tmp_path, "folder", ["a", "b", "c"], masks=False)
    Image.fromarray(_mask()).save(tmp_path / "masks" / "a.PNG")
    Image.fromarray(_mask()).save(tmp_path / "masks" / "b.bmp")
    Image.fromarray(_mask()).save(tmp_path / "masks" / "typo.png")
    (tmp_path / "masks" / "notes.txt").write_text("labels by hand")
    with caplog.at_level(logging.WARNING):
        dataset = load_source("folder", tmp_path, cache_dir=tmp_path / "cache")
    assert dataset["id"] == ["a", "b", "c"]
    assert [row["label"] is not None for row in dataset] == [True, True, False]
    assert np.array_equal(np.asarray(dataset[1]["label"]), _mask())
    assert "2 files in" in caplog.text and "notes.txt" in caplog.text and "typo.png" in caplog.text
    Image.fromarray(_mask()).save(tmp_path / "masks" / "c.tif")
    Image.fromarray(_mask()).save(tmp_path / "masks" / "c.png")
    with pytest.raises(ValueError, match=r"image 'c' has 2 masks: .*c\.png, .*c\.tif; keep one"):
        load_source("folder", tmp_path, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("extension", [".jpg", ".JPEG", ".webp"])
def test_lossy_masks_are_refused(tmp_path, extension):  # (lossless WebP has no grey mode: refused as a colour image)
    if extension == ".webp" and not features.check("webp"):
        pytest.skip("Pillow without WebP")
    _layout(tmp_path, "folder", ["a"], masks=False)
    Image.fromarray(_mask()).save(tmp_path / "masks" / f"a{extension}", quality=90)
    kind = "lossy WebP" if extension == ".webp" else "JPEG"
    with pytest.raises(
        ValueError, match=rf"mask .*a\{extension} is a {kind} file; lossy coding .*export masks as PNG"
    ):
        load_source("folder", tmp_path, cache_dir=tmp_path / "cache")


def test_jpeg_masks_named_in_a_split_are_refused(tmp_path):
    args, _ = _layout(tmp_path, "pascal", ["a"])
    Image.fromarray(_mask()).save(tmp_path / "SegmentationClass" / "a.png", format="JPEG")  # a JPEG named .png
    with pytest.raises(ValueError, match=r"mask .*a\.png is a JPEG file"):
        load_source(*args, cache_dir=tmp_path / "cache")


# ---- 16-bit and float images ----------------------------------------------------------------------


def _deep_image(path, mode):
    values = np.linspace(1000, 4000, SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0])  # all above 255: white if clipped
    values = values.astype(np.uint16 if mode == "I;16" else np.float32)
    image = Image.fromarray(values)
    assert image.mode == mode
    image.save(path)
    values = values.astype(np.float64)
    expected = np.rint((values - values.min()) * (255 / (values.max() - values.min()))).astype(np.uint8)
    return np.repeat(expected[..., None], 3, axis=2)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("F", ".tif")])
def test_16_bit_and_float_images_are_stretched_not_clipped(tmp_path, mode, suffix):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "id2label.json").write_text(json.dumps(CLASSES))
    expected = _deep_image(tmp_path / "images" / f"a{suffix}", mode)
    Image.fromarray(_mask()).save(tmp_path / "masks" / "a.png")
    labeled = load_source("folder", tmp_path, cache_dir=tmp_path / "cache")
    assert np.array_equal(np.asarray(rgb_image(Image.open(tmp_path / "images" / f"a{suffix}"))), expected)
    pixels, _ = EvalDataset(labeled)[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    restored = torch.round((pixels * std + mean) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(restored, expected)
    torch.manual_seed(0)
    crop, _ = SupOnlyDataset(labeled, TrainTransform(base_size=40, crop_size=40))[0]
    assert (crop < 250).float().mean() > 0.5  # clipped, every pixel of the crop would be 255


# ---- splits: encodings, spaces, overlap -----------------------------------------------------------


def test_split_files_with_a_bom_spaces_and_latin1(tmp_path):
    (tmp_path / "my photos").mkdir()
    Image.fromarray(_pixels()).save(tmp_path / "my photos" / "a 1.png")
    Image.fromarray(_mask()).save(tmp_path / "my photos" / "a 1 mask.png")
    Image.fromarray(_pixels(1)).save(tmp_path / "b.png")
    entries = [SplitEntry("my photos/a 1.png", "my photos/a 1 mask.png"), SplitEntry("b.png")]
    path = write_split(tmp_path / "split.txt", entries)
    assert path.read_text() == "my photos/a 1.png\tmy photos/a 1 mask.png\nb.png\n"
    assert read_split(path) == entries
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows Notepad saves UTF-8
    dataset = load_source("pascal", tmp_path, path, cache_dir=tmp_path / "cache")
    assert dataset["id"] == ["a 1", "b"] and np.array_equal(np.asarray(dataset[0]["label"]), _mask())
    with pytest.raises(ValueError, match=r"got 7 fields \(paths with spaces: separate image and mask with a tab\)"):
        parse_split("my photos/a 1.png my photos/a 1 mask.png\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("images/caf\u00e9.png\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"split file .*latin1\.txt is not UTF-8 text \(byte 10: b'\\xe9'\); save it as UTF-8"
    ):
        load_source("pascal", tmp_path, latin1)


def test_overlapping_sets_are_refused_or_reported(tmp_path, caplog):
    check_split_overlap(["a", "b"], ["c"], ["d"])
    with pytest.raises(
        ValueError,
        match=(
            r"val set \(2 images\) shares 1 images with the labeled set "
            r"and 1 with the unlabeled set \(e\.g\. b, c\)"
        ),
    ):
        check_split_overlap(["a", "b"], ["c"], ["b", "c"])
    with caplog.at_level(logging.WARNING):
        check_split_overlap(["a", "b"], ["b", "c"], ["d"])
    assert "1 of 2 labeled images are also in the unlabeled set (e.g. b)" in caplog.text
    # one file under two ids (a link, another root) is found by its real path
    args, _ = _layout(tmp_path, "folder", ["a", "b"])
    (tmp_path / "images" / "copy.jpg").symlink_to(tmp_path / "images" / "a.jpg")
    (tmp_path / "train.txt").write_text("images/a.jpg masks/a.png\n")
    (tmp_path / "val.txt").write_text("images/b.jpg masks/b.png\nimages/copy.jpg masks/a.png\n")
    train, val = (
        load_source("folder", tmp_path, tmp_path / name, cache_dir=tmp_path / "cache")
        for name in ("train.txt", "val.txt")
    )
    with pytest.raises(ValueError, match=r"shares 1 images with the labeled set .*e\.g\. copy \(.*a\.jpg\)"):
        check_split_overlap(train, ["u"], val)


# ---- decompression-bomb limit ----------------------------------------------------------------------


@pytest.mark.slow
def test_images_over_the_pixel_limit_name_the_file_and_the_way_out(tmp_path, monkeypatch):
    args, _ = _layout(tmp_path, "pascal", ["a"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40x30 = 1200 pixels > 2 * 500
    with pytest.raises(
        ValueError,
        match=(
            r"(image|mask) .*a\.(jpg|png) is over PIL's decompression-bomb limit of 1000 pixels"
            r".*STPP_MAX_IMAGE_PIXELS=n"
        ),
    ):
        load_source(*args, cache_dir=tmp_path / "cache")
    code = "from PIL import Image; import stpp_hf.data.images; print(Image.MAX_IMAGE_PIXELS)"
    for value, expected in (("400000000", "400000000"), ("0", "None")):
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={"STPP_MAX_IMAGE_PIXELS": value, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() == expected


# ---- pseudo-label store: names and paths -----------------------------------------------------------


def test_pseudo_label_names_stay_short_for_long_and_non_ascii_ids(tmp_path):
    ids = ["\u56fe" * 28, "x" * 300, "train/aachen/aachen_000000_000019", "2007_000032", "\udce9t\u00e9"]
    store = PseudoLabelStore(tmp_path / "store")
    for index, image_id in enumerate(ids):
        store.put(image_id, np.full((3, 4), index, np.uint8))
    store.verify(ids)
    assert [int(store.get(image_id)[0, 0]) for image_id in ids] == list(range(len(ids)))
    check_label_file_names(tmp_path / "root", ids)
    names = [PseudoLabelStore.file_name(image_id) for image_id in ids]
    assert max(len(name) for name in names) <= 110 and len(set(names)) == len(ids)
    # short ids keep their readable names, so stores written before stay valid
    assert names[2:4] == ["labels/train%2Faachen%2Faachen_000000_000019.png", "labels/2007_000032.png"]


def test_label_name_check_fails_before_training_on_names_the_file_system_refuses(tmp_path, monkeypatch):
    def unbounded(image_id):  # the names before this check: percent-encoded ids of any length
        return f"labels/{'%E5%9B%BE' * len(image_id)}.png"

    monkeypatch.setattr(PseudoLabelStore, "file_name", staticmethod(unbounded))
    with pytest.raises(
        ValueError,
        match=r"cannot create a pseudo-label file for id '\u56fe+' .*put the run directory on another file system",
    ):
        check_label_file_names(tmp_path, ["a", "\u56fe" * 28])


def test_store_refuses_manifest_paths_outside_it(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"outside")
    store = PseudoLabelStore(tmp_path / "store")
    store.put("a", np.zeros((3, 4), np.uint8))
    entry = dict(store.entries()["a"], id="b", file="../secret.png")
    (tmp_path / "store" / "journal-edited.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match=r"the entry of 'b' names '\.\./secret\.png', outside .*labels"):
        PseudoLabelStore(tmp_path / "store").open("b")
    assert PseudoLabelStore(tmp_path / "store").pending(["a", "b"]) == ["b"]


# ---- examples/infer.py -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infer_setup(infer, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    model = save_tiny_model(model_dir, ("background", "thing"))
    return infer, model_dir, model


def _predicted(model, image):
    pixel_values = DeepLabImageProcessor()(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values).logits.argmax(dim=1)[0].numpy()


def test_infer_masks_follow_the_stored_pixels_and_carry_the_photo_orientation(infer_setup, tmp_path):
    infer, model_dir, model = infer_setup
    photo = tmp_path / "photo.jpg"
    Image.fromarray(_pixels()).save(photo, quality=95, exif=_exif(6))
    infer.main(["--model", str(model_dir), "--images", str(photo), "--output-dir", str(tmp_path / "out")])
    mask, overlay = (Image.open(tmp_path / "out" / f"photo_{kind}.png") for kind in ("mask", "overlay"))
    assert mask.size == overlay.size == SIZE
    assert mask.getexif()[0x0112] == overlay.getexif()[0x0112] == 6  # a viewer turns them as it turns the photo
    assert np.array_equal(np.asarray(mask), _predicted(model, Image.fromarray(_stored(photo))))


def test_infer_stretches_16_bit_images(infer_setup, tmp_path, monkeypatch):
    infer, model_dir, model = infer_setup
    expected = _deep_image(tmp_path / "deep.png", "I;16")
    inputs = []
    predict = infer.predict
    monkeypatch.setattr(
        infer,
        "predict",
        lambda model, pixel_values, args: inputs.append(pixel_values) or predict(model, pixel_values, args),
    )
    infer.main(
        ["--model", str(model_dir), "--images", str(tmp_path / "deep.png"), "--output-dir", str(tmp_path / "out")]
    )
    assert torch.equal(
        inputs[0], DeepLabImageProcessor()(images=Image.fromarray(expected), return_tensors="pt")["pixel_values"]
    )
    mask = Image.open(tmp_path / "out" / "deep_mask.png")
    assert "exif" not in mask.info and np.array_equal(np.asarray(mask), _predicted(model, Image.fromarray(expected)))
    image, orientation = infer.read_image(tmp_path / "deep.png")
    assert np.array_equal(np.asarray(image), expected) and orientation == 1
