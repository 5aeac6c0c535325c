import hashlib

import numpy as np
import pytest
from PIL import Image

from stpp_hf.data import load_source, make_synthetic_dataset, read_split, synthetic
from stpp_hf.data.synthetic import SYNTHETIC_ID2LABEL, main, save_sample_grid

SMALL = dict(num_labeled=4, num_unlabeled=12, num_val=6, image_size=48)


def _digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_deterministic_from_the_seed(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", seed=5, **SMALL)
    again = make_synthetic_dataset(tmp_path / "b", seed=5, **SMALL)
    other = make_synthetic_dataset(tmp_path / "c", seed=6, **SMALL)
    assert _digest(first.root) == _digest(again.root)
    assert _digest(first.root) != _digest(other.root)


def test_val_images_do_not_depend_on_train_counts(tmp_path):
    small = make_synthetic_dataset(tmp_path / "a", seed=0, **SMALL)
    larger = make_synthetic_dataset(tmp_path / "b", seed=0, **{**SMALL, "num_unlabeled": 30})
    for name in ("val_00000.jpg", "val_00005.jpg", "train_00003.jpg"):
        assert (small.root / "JPEGImages" / name).read_bytes() == (larger.root / "JPEGImages" / name).read_bytes()


def test_voc_layout_loads_through_the_pascal_source(tmp_path):
    dataset = make_synthetic_dataset(tmp_path / "data", seed=0, **SMALL)
    assert dataset.id2label == SYNTHETIC_ID2LABEL and len(dataset.palette) == 768
    counts = {part: len(read_split(path)) for part, path in dataset.split_files.items()}
    assert counts == {"labeled": 4, "unlabeled": 12, "val": 6}
    labeled = {entry.image for entry in read_split(dataset.split_files["labeled"])}
    assert not labeled & {entry.image for entry in read_split(dataset.split_files["unlabeled"])}
    val = load_source(
        "pascal", dataset.root, dataset.split_files["val"], num_labels=dataset.num_labels, cache_dir=tmp_path / "c"
    )
    mask = val[0]["label"]
    assert mask.mode == "P" and mask.getpalette()[3:6] == [128, 0, 0] and val[0]["image"].size == (48, 48)


def test_classes_cover_the_images_in_sensible_proportions(tmp_path):
    dataset = make_synthetic_dataset(tmp_path, seed=0, num_labeled=20, num_unlabeled=40, num_val=1, image_size=64)
    masks = [np.asarray(Image.open(dataset.root / e.mask)) for e in read_split(dataset.split_files["unlabeled"])]
    pixels = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=6)
    fractions = pixels / pixels.sum()
    assert len(pixels) == 6  # only classes 0..5, no stray values
    assert 0.4 < fractions[0] < 0.9  # background dominates but objects are large
    assert (fractions[1:] > 0.02).all()  # every object class shows up
    images_per_class = [sum(int((m == c).any()) for m in masks) for c in range(1, 6)]
    assert min(images_per_class) >= 8
    objects_per_image = [len(np.unique(m)) - 1 for m in masks]
    assert np.mean(objects_per_image) >= 2


def test_reuse_replace_and_refuse(tmp_path):
    root = tmp_path / "data"
    make_synthetic_dataset(root, seed=0, **SMALL)
    marker = root / "JPEGImages" / "val_00000.jpg"
    stamp = marker.stat().st_mtime_ns
    make_synthetic_dataset(root, seed=0, **SMALL)  # same settings: reused untouched
    assert marker.stat().st_mtime_ns == stamp
    replaced = make_synthetic_dataset(root, seed=0, **{**SMALL, "num_val": 2})
    assert len(read_split(replaced.split_files["val"])) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_synthetic_dataset(other, seed=0, **SMALL)
    with pytest.raises(ValueError, match="num_labeled must be >= 1"):
        make_synthetic_dataset(tmp_path / "x", num_labeled=0)


def test_generation_renders_each_image_once_and_cli_writes_grid(tmp_path, capsys, monkeypatch):
    # the work is one rendering per image, and none for a directory that already holds the same settings
    rendered = []
    render = synthetic.render_sample
    monkeypatch.setattr(synthetic, "render_sample", lambda *args: rendered.append(args) or render(*args))
    main(
        [
            "--output-dir",
            str(tmp_path / "data"),
            "--num-unlabeled",
            "200",
            "--num-val",
            "40",
            "--sample-grid",
            str(tmp_path / "grid.png"),
        ]
    )
    assert len(rendered) == 20 + 200 + 40
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (8 * 192 + 7 * 4, 2 * 192 + 4)
    assert "sample grid" in capsys.readouterr().out
    assert save_sample_grid(
        make_synthetic_dataset(tmp_path / "data", num_unlabeled=200, num_val=40), tmp_path / "g2.png", num_samples=3
    )
    assert len(rendered) == 20 + 200 + 40  # reused, not rendered again
