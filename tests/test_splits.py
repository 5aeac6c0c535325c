from collections import Counter

import pytest

from stpp_hf.data.splits import (
    SplitEntry,
    generate_split,
    list_shipped_splits,
    parse_split,
    read_split,
    resolve_split_file,
    shipped_split_files,
    shipped_split_path,
    write_split,
)


def test_parse_official_format_without_final_newline():
    text = "JPEGImages/a.jpg SegmentationClass/a.png\n\nJPEGImages/b.jpg SegmentationClass/b.png"
    assert parse_split(text) == [
        SplitEntry("JPEGImages/a.jpg", "SegmentationClass/a.png"),
        SplitEntry("JPEGImages/b.jpg", "SegmentationClass/b.png"),
    ]


def test_image_only_lines_are_unlabeled_unless_masks_required():
    assert parse_split("x.jpg\ny.jpg y.png\n") == [SplitEntry("x.jpg"), SplitEntry("y.jpg", "y.png")]
    with pytest.raises(ValueError, match="s.txt:1: a mask path is required"):
        parse_split("x.jpg\n", source="s.txt", require_masks=True)


def test_malformed_duplicate_and_empty_splits_name_the_line():
    with pytest.raises(ValueError, match=r"s.txt:2: expected '<image> \[<mask>\]', got 3 fields"):
        parse_split("a.jpg a.png\na.jpg a.png extra\n", source="s.txt")
    with pytest.raises(ValueError, match="s.txt:3: duplicate image 'a.jpg' \\(first on line 1\\)"):
        parse_split("a.jpg a.png\nb.jpg b.png\na.jpg c.png\n", source="s.txt")
    with pytest.raises(ValueError, match="s.txt: the split is empty"):
        parse_split("\n  \n", source="s.txt")


def test_write_read_round_trip(tmp_path):
    entries = [SplitEntry("i/1.jpg", "m/1.png"), SplitEntry("i/2.jpg")]
    path = write_split(tmp_path / "sub" / "split.txt", entries)
    assert path.read_text() == "i/1.jpg m/1.png\ni/2.jpg\n"
    assert read_split(path) == entries
    assert list(tmp_path.rglob("*.tmp")) == []


def test_shipped_partitions_parse_and_have_the_paper_sizes():
    names = list_shipped_splits()
    assert "pascal/val" in names and "cityscapes/1_30/split_0/labeled" in names and "pascal/1.4k/labeled" in names
    assert len(names) == 64
    sizes = {name: len(read_split(name)) for name in ("pascal/92/split_0/labeled", "pascal/val", "cityscapes/val")}
    assert sizes == {"pascal/92/split_0/labeled": 92, "pascal/val": 1449, "cityscapes/val": 500}
    files = shipped_split_files("pascal", "1_16/split_0")
    labeled = {entry.image for entry in read_split(files["labeled"])}
    unlabeled = {entry.image for entry in read_split(files["unlabeled"])}
    assert len(labeled) == 662 and len(labeled) + len(unlabeled) == 10582 and not labeled & unlabeled
    assert files["val"] == shipped_split_path("pascal/val")


def test_unknown_names_and_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shipped split named 'pascal/1_3/split_0/labeled'"):
        shipped_split_path("pascal/1_3/split_0/labeled")
    with pytest.raises(FileNotFoundError, match="no shipped split"):
        shipped_split_path("../splits/pascal/val")
    with pytest.raises(FileNotFoundError, match="split file .*nope.txt does not exist"):
        resolve_split_file(tmp_path / "nope.txt")


def _entries(count):
    return [SplitEntry(f"img/{index}.jpg", f"mask/{index}.png") for index in range(count)]


def test_generate_split_is_seeded_disjoint_and_complete(tmp_path):
    entries = _entries(50)
    first = generate_split(entries, tmp_path / "a", num_labeled=7, seed=3)
    again = generate_split(entries, tmp_path / "b", num_labeled=7, seed=3)
    other = generate_split(entries, tmp_path / "c", fraction=0.14, seed=4)
    labeled, unlabeled = read_split(first["labeled"]), read_split(first["unlabeled"])
    assert len(labeled) == 7 and len(unlabeled) == 43
    assert set(labeled) | set(unlabeled) == set(entries) and not set(labeled) & set(unlabeled)
    assert first["labeled"].read_text() == again["labeled"].read_text()
    assert first["labeled"].read_text() != other["labeled"].read_text()
    with pytest.raises(ValueError, match="exactly one of"):
        generate_split(entries, tmp_path, num_labeled=3, fraction=0.1)
    with pytest.raises(ValueError, match="num_labeled must be in"):
        generate_split(entries, tmp_path, num_labeled=50)


def test_generate_split_stratified_keeps_proportions(tmp_path):
    entries = _entries(100)
    strata = ["rare"] * 10 + ["common"] * 90
    for seed in range(5):
        files = generate_split(entries, tmp_path / str(seed), num_labeled=10, seed=seed, strata=strata)
        labeled = read_split(files["labeled"])
        counts = Counter(strata[int(entry.image.split("/")[1].split(".")[0])] for entry in labeled)
        assert counts == {"rare": 1, "common": 9}
