import json
import sys

import numpy as np
import pytest
from datasets.distributed import split_dataset_by_node
from PIL import Image

from stpp_hf.data import SOURCES, load_source, make_synthetic_dataset
from stpp_hf.data.sources.cityscapes import label_ids_to_train_ids


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), seed=1, num_labeled=3, num_unlabeled=5, num_val=2, image_size=40
    )


def _write_pair(root, name, size=(40, 30), mask_size=None, mask_value=1, mask_mode="P"):
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(root / "JPEGImages" / f"{name}.jpg")
    mask = Image.new("L", mask_size or size, mask_value)
    if mask_mode == "P":
        mask.putpalette(list(range(256)) * 3)  # L -> P with the same indices
    else:
        mask = mask.convert(mask_mode)
    mask.save(root / "SegmentationClass" / f"{name}.png")
    return f"JPEGImages/{name}.jpg SegmentationClass/{name}.png"


def _split(root, lines, name="split.txt"):
    path = root / name
    path.write_text("\n".join(lines))
    return path


def test_registry():
    assert {"pascal", "cityscapes", "folder"} <= set(SOURCES)
    with pytest.raises(ValueError, match="unknown dataset source 'voc'; registered: cityscapes, folder, pascal"):
        load_source("voc", ".", "x.txt")


def test_pascal_layout_features_and_ids(synthetic, tmp_path):
    dataset = load_source("pascal", synthetic.root, synthetic.split_files["labeled"], cache_dir=tmp_path)
    assert set(dataset.features) == {"id", "image", "label"}
    assert dataset["id"] == ["train_00000", "train_00001", "train_00002"]
    row = dataset[0]
    assert row["image"].mode == "RGB" and row["image"].size == (40, 40)
    assert row["label"].mode == "P"  # class indices, never converted to colours
    expected = np.asarray(Image.open(synthetic.root / "SegmentationClass" / "train_00000.png"))
    assert np.array_equal(np.asarray(row["label"]), expected)


def test_image_only_lines_give_unlabeled_rows(tmp_path):
    line = _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b")
    dataset = load_source(
        "pascal", tmp_path, _split(tmp_path, [line, "JPEGImages/b.jpg"]), cache_dir=tmp_path / "cache"
    )
    assert dataset[1]["id"] == "b" and dataset[1]["label"] is None and dataset[0]["label"] is not None
    with pytest.raises(ValueError, match="1 images have no mask \\(first: .*b.jpg\\), but masks are required"):
        load_source("pascal", tmp_path, _split(tmp_path, [line, "JPEGImages/b.jpg"]), require_masks=True)


def test_changed_split_or_file_gets_a_new_fingerprint(tmp_path):
    lines = [_write_pair(tmp_path, name) for name in ("a", "b", "c")]
    cache = tmp_path / "cache"
    full = load_source("pascal", tmp_path, _split(tmp_path, lines), cache_dir=cache)
    same = load_source("pascal", tmp_path, _split(tmp_path, lines), cache_dir=cache)
    shorter = load_source("pascal", tmp_path, _split(tmp_path, lines[:2]), cache_dir=cache)
    assert full._fingerprint == same._fingerprint
    assert len(shorter) == 2 and shorter._fingerprint != full._fingerprint
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "JPEGImages" / "c.jpg", quality=50)
    changed = load_source("pascal", tmp_path, _split(tmp_path, lines), cache_dir=cache)
    assert changed._fingerprint != full._fingerprint


@pytest.mark.parametrize(
    "make_bad, error, message",
    [
        (
            lambda root: (root / "JPEGImages" / "a.jpg").unlink(),
            FileNotFoundError,
            r"image .*a\.jpg \(id 'a'\) does not exist",
        ),
        (
            lambda root: (root / "SegmentationClass" / "a.png").unlink(),
            FileNotFoundError,
            r"mask .*a\.png \(id 'a'\) does not exist",
        ),
        (
            lambda root: (root / "JPEGImages" / "a.jpg").write_bytes(b"not an image"),
            ValueError,
            r"cannot decode image .*a\.jpg",
        ),
        (lambda root: _truncate(root / "JPEGImages" / "a.jpg"), ValueError, r"cannot decode image .*a\.jpg"),
        (
            lambda root: _write_pair(root, "a", mask_size=(40, 31)),
            ValueError,
            r"image .*a\.jpg is 40x30 but its mask .*a\.png is 40x31",
        ),
        (
            lambda root: _write_pair(root, "a", mask_value=30),
            ValueError,
            r"a\.png: mask values \[30\] are outside \[0, 21\) and 255",
        ),
        (lambda root: _write_pair(root, "a", mask_mode="RGB"), ValueError, r"mask .*a\.png has mode 'RGB'"),
    ],
)
def test_validation_errors_name_the_file(tmp_path, make_bad, error, message):
    lines = [_write_pair(tmp_path, "z"), _write_pair(tmp_path, "a")]
    make_bad(tmp_path)
    with pytest.raises(error, match=message):
        load_source("pascal", tmp_path, _split(tmp_path, lines), cache_dir=tmp_path / "cache")


def _truncate(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-200])


def test_ignore_value_and_empty_split(tmp_path):
    line = _write_pair(tmp_path, "a", mask_value=255)
    assert len(load_source("pascal", tmp_path, _split(tmp_path, [line]), cache_dir=tmp_path / "c")) == 1
    with pytest.raises(ValueError, match="empty.txt: the split is empty"):
        load_source("pascal", tmp_path, _split(tmp_path, [""], name="empty.txt"))


def _cityscapes(root):
    frames = {"aachen": "aachen_000000_000019", "bochum": "aachen_000000_000019"}  # same frame name, two cities
    lines = []
    for city, frame in frames.items():
        image = root / "leftImg8bit" / "train" / city / f"{frame}_leftImg8bit.png"
        image.parent.mkdir(parents=True)
        Image.new("RGB", (8, 4)).save(image)
        gt = root / "gtFine" / "train" / city
        gt.mkdir(parents=True)
        lines.append(
            f"leftImg8bit/train/{city}/{frame}_leftImg8bit.png gtFine/train/{city}/{frame}_gtFine_labelTrainIds.png"
        )
        raw = np.array([[7, 26, 0, 33, 24, 11, 17, 23]] * 4, dtype=np.uint8)  # road, car, unlabeled, bicycle, ...
        if city == "aachen":
            Image.fromarray(raw, mode="L").save(gt / f"{frame}_gtFine_labelIds.png")
        else:
            Image.fromarray(np.full((4, 8), 5, np.uint8), mode="L").save(gt / f"{frame}_gtFine_labelTrainIds.png")
    return _split(root, lines)


def test_cityscapes_train_ids_and_raw_label_ids(tmp_path):
    dataset = load_source("cityscapes", tmp_path, _cityscapes(tmp_path), cache_dir=tmp_path / "cache")
    assert dataset["id"] == ["train/aachen/aachen_000000_000019", "train/bochum/aachen_000000_000019"]
    # official table: road 7->0, car 26->13, unlabeled 0->255, bicycle 33->18, person 24->11, building 11->2,
    # pole 17->5, sky 23->10
    assert np.asarray(dataset[0]["label"])[0].tolist() == [0, 13, 255, 18, 11, 2, 5, 10]
    assert (np.asarray(dataset[1]["label"]) == 5).all()


def test_cityscapes_without_label_table_says_what_to_install(tmp_path, monkeypatch):
    split = _cityscapes(tmp_path)
    label_ids_to_train_ids.cache_clear()
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers.labels", None)
    try:
        with pytest.raises(ImportError, match=r'pip install "stpp-hf\[cityscapes\]"'):
            load_source("cityscapes", tmp_path, split, cache_dir=tmp_path / "cache")
    finally:
        label_ids_to_train_ids.cache_clear()


def test_folder_with_unlabeled_images_and_id2label(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "images" / sub).mkdir(parents=True)
        Image.new("RGB", (6, 5)).save(tmp_path / "images" / sub / "001.jpg")
    (tmp_path / "masks" / "a").mkdir(parents=True)
    Image.new("L", (6, 5), 2).save(tmp_path / "masks" / "a" / "001.png")
    with pytest.raises(FileNotFoundError, match="id2label.json does not exist"):
        load_source("folder", tmp_path)
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "background", "1": "cat", "2": "dog"}))
    dataset = load_source("folder", tmp_path, cache_dir=tmp_path / "cache")
    assert dataset["id"] == ["a/001", "b/001"]
    assert dataset[1]["label"] is None and (np.asarray(dataset[0]["label"]) == 2).all()
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "background", "1": "cat"}))
    with pytest.raises(ValueError, match=r"001\.png: mask values \[2\] are outside \[0, 2\)"):
        load_source("folder", tmp_path, cache_dir=tmp_path / "cache")


def test_streaming_matches_and_shards_once(synthetic, tmp_path):
    built = load_source("pascal", synthetic.root, synthetic.split_files["unlabeled"], cache_dir=tmp_path)
    stream = load_source("pascal", synthetic.root, synthetic.split_files["unlabeled"], streaming=True)
    rows = list(stream)
    assert [row["id"] for row in rows] == built["id"]
    assert np.array_equal(np.asarray(rows[2]["label"]), np.asarray(built[2]["label"]))
    assert stream.num_shards == len(built)  # one shard per image: splits evenly across processes
    shards = [[row["id"] for row in split_dataset_by_node(stream, rank, 2)] for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(built["id"]) and not set(shards[0]) & set(shards[1])


def test_streaming_validates_while_iterating(tmp_path):
    lines = [_write_pair(tmp_path, "a"), _write_pair(tmp_path, "b", mask_value=40)]
    stream = load_source("pascal", tmp_path, _split(tmp_path, lines), streaming=True)
    with pytest.raises(ValueError, match=r"b\.png: mask values \[40\]"):
        list(stream)


def test_parallel_build_and_unvalidated_build_give_the_same_rows(synthetic, tmp_path):
    reference = load_source("pascal", synthetic.root, synthetic.split_files["unlabeled"], cache_dir=tmp_path / "a")
    parallel = load_source(
        "pascal", synthetic.root, synthetic.split_files["unlabeled"], cache_dir=tmp_path / "b", num_proc=2
    )
    quick = load_source(
        "pascal", synthetic.root, synthetic.split_files["unlabeled"], cache_dir=tmp_path / "c", validate=False
    )
    assert list(parallel["id"]) == list(reference["id"]) == list(quick["id"])
    assert quick._fingerprint != reference._fingerprint  # validation settings are part of the cache key
    assert np.array_equal(np.asarray(parallel[4]["label"]), np.asarray(reference[4]["label"]))


def test_sources_own_their_class_names_and_palettes(tmp_path):
    from stpp_hf.data.sources import get_source

    id2label, palette = get_source("pascal").classes(tmp_path)
    assert len(id2label) == 21 and id2label[15] == "person" and palette[3:6] == [128, 0, 0] and len(palette) == 768
    id2label, palette = get_source("cityscapes").classes(tmp_path)
    assert len(id2label) == 19 and id2label[0] == "road" and palette[:3] == [128, 64, 128]
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "background", "1": "cat"}))
    id2label, palette = get_source("folder").classes(tmp_path)
    assert id2label == {0: "background", 1: "cat"} and palette[3:6] == [128, 0, 0]
