"""examples/infer.py on a few images: masks, overlays and class areas match the model's own predictions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_hub import save_tiny_model
from PIL import Image

from stpp_hf import DeepLabImageProcessor, DeepLabV3PlusForSemanticSegmentation

CLASS_NAMES = ("background", "disc", "square", "stripe")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    save_tiny_model(directory, CLASS_NAMES)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three images of two sizes in a directory (one JPEG) and one more outside it."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "folder").mkdir()
    paths = []
    for name, (height, width) in (
        ("folder/a.png", (40, 48)),
        ("folder/b.jpg", (40, 48)),
        ("folder/c.png", (33, 57)),
        ("d.png", (40, 48)),
    ):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        paths.append(root / name)
    (root / "folder" / "notes.txt").write_text("not an image")
    return root, paths


def expected_label_map(model, path: Path, mode: str) -> torch.Tensor:
    pixel_values = DeepLabImageProcessor()(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if mode == "tta":
            scores = model.predict_tta(pixel_values)
        elif mode == "sliding_window":
            scores = model.predict_sliding_window(pixel_values, 24, 16)
        else:
            scores = model(pixel_values).logits
    return scores.argmax(dim=1)[0]


def test_infer_writes_masks_overlays_and_class_areas(infer, model_dir, images, tmp_path, capsys):
    root, paths = images
    output_dir = tmp_path / "out"
    areas = infer.main(["--model", str(model_dir), "--images", str(root / "folder"), str(root / "d.png"),
                        "--output-dir", str(output_dir), "--batch-size", "2"])  # fmt: skip
    printed = capsys.readouterr()
    model = DeepLabV3PlusForSemanticSegmentation.from_pretrained(model_dir).eval()
    assert sorted(file.name for file in output_dir.iterdir()) == sorted(
        ["class_areas.json"] + [f"{path.stem}_{kind}.png" for path in paths for kind in ("mask", "overlay")]
    )
    assert json.loads((output_dir / "class_areas.json").read_text()) == areas
    for path in paths:
        mask = Image.open(output_dir / f"{path.stem}_mask.png")
        overlay = Image.open(output_dir / f"{path.stem}_overlay.png")
        assert mask.mode == "P" and overlay.mode == "RGB"
        assert mask.size == overlay.size == Image.open(path).size
        label_map = expected_label_map(model, path, "plain")
        assert np.array_equal(np.asarray(mask), label_map.numpy())
        counts = torch.bincount(label_map.flatten(), minlength=len(CLASS_NAMES))
        expected_areas = {
            CLASS_NAMES[index]: count.item() / label_map.numel() for index, count in enumerate(counts) if count
        }
        assert areas[str(path)] == pytest.approx(expected_areas, abs=1e-6)
        assert f"{path}: " in printed.out + printed.err


@pytest.mark.parametrize("mode", ["tta", "sliding_window"])
def test_infer_tta_and_sliding_window_match_the_model_helpers(infer, model_dir, images, tmp_path, mode):
    _, paths = images
    options = ["--tta"] if mode == "tta" else ["--sliding-window", "--window-size", "24", "--stride", "16"]
    infer.main(["--model", str(model_dir), "--images", str(paths[2]), "--output-dir", str(tmp_path), *options])
    model = DeepLabV3PlusForSemanticSegmentation.from_pretrained(model_dir).eval()
    mask = np.asarray(Image.open(tmp_path / f"{paths[2].stem}_mask.png"))
    assert np.array_equal(mask, expected_label_map(model, paths[2], mode).numpy())


def test_infer_bfloat16_runs(infer, model_dir, images, tmp_path):
    _, paths = images
    areas = infer.main(
        ["--model", str(model_dir), "--images", str(paths[0]), "--output-dir", str(tmp_path), "--dtype", "bfloat16"]
    )
    assert sum(areas[str(paths[0])].values()) == pytest.approx(1.0, abs=1e-5)
    assert Image.open(tmp_path / "a_mask.png").size == (48, 40)


def test_infer_rejects_bad_inputs(infer, images, tmp_path):
    root, paths = images
    with pytest.raises(FileNotFoundError, match="missing.png"):
        infer.collect_images([str(root / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        infer.collect_images([str(tmp_path / "empty")])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="same outputs"):
        infer.collect_images([str(paths[0]), str(tmp_path / "a.png")])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        infer.batches_by_size([tmp_path / "broken.png"], batch_size=2)
    with pytest.raises(SystemExit):
        infer.parse_args(["--model", "m", "--images", "x", "--output-dir", "o", "--tta", "--sliding-window"])


@pytest.mark.parametrize("model", ["./runs/stpp/fnal", "runs/stpp/fnal", "/no/such/run/final"])
def test_a_mistyped_local_model_path_is_refused_before_any_hub_request(infer, images, tmp_path, model, monkeypatch):
    _, paths = images

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for a local path")

    monkeypatch.setattr(infer.AutoModelForSemanticSegmentation, "from_pretrained", no_hub)
    with pytest.raises(FileNotFoundError, match=f"--model {model}: no such directory"):
        infer.main(["--model", model, "--images", str(paths[0]), "--output-dir", str(tmp_path / "out")])


def test_a_hub_repo_id_is_not_taken_for_a_local_path(infer):
    infer.check_model_path("you/deeplabv3plus-stpp-pascal")  # no error: it goes to the Hub


def test_images_are_decoded_batch_by_batch(infer, model_dir, images, tmp_path, monkeypatch):
    from PIL import ImageFile

    root, paths = images
    decoded, decoded_before_first_forward = set(), []
    original_load, original_predict = ImageFile.ImageFile.load, infer.predict

    def counting_load(image):
        decoded.add(getattr(image, "filename", None))
        return original_load(image)

    def recording_predict(*args, **kwargs):
        if not decoded_before_first_forward:
            decoded_before_first_forward.append(len(decoded))
        return original_predict(*args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    monkeypatch.setattr(infer, "predict", recording_predict)
    infer.main(["--model", str(model_dir), "--images", str(root / "folder"), str(root / "d.png"),
                "--output-dir", str(tmp_path / "out"), "--batch-size", "2"])  # fmt: skip
    # 4 images: the first forward pass sees its batch of 2 decoded, not the whole list
    assert decoded_before_first_forward == [2] and len(decoded) == 4


def test_an_output_directory_inside_the_images_is_not_segmented_again(infer, model_dir, images, tmp_path):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(images[0] / "folder", folder)
    arguments = ["--model", str(model_dir), "--images", str(folder), "--output-dir", str(folder / "masks")]
    first = infer.main(arguments)
    second = infer.main(arguments)
    assert sorted(first) == sorted(second) == sorted(str(folder / name) for name in ("a.png", "b.jpg", "c.png"))
    assert sorted(path.name for path in (folder / "masks").iterdir()) == sorted(
        ["class_areas.json"] + [f"{stem}_{kind}.png" for stem in "abc" for kind in ("mask", "overlay")]
    )
