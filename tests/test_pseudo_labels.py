import json
import pickle

import numpy as np
import pytest
from PIL import Image

from stpp_hf.data.pseudo_labels import MANIFEST_FILE, PseudoLabelStore, teacher_fingerprint
from stpp_hf.models.deeplab.label_presets import flat_palette


def _label(seed, shape=(12, 17)):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 6, shape).astype(np.uint8)
    label[0, 0] = 255
    return label


def test_put_get_round_trip_as_palette_png(tmp_path):
    store = PseudoLabelStore(tmp_path / "store", palette=flat_palette("pascal_voc"))
    ids = ["a", "train/aachen/x_000001", "train/bochum/x_000001", "100%_done"]
    for index, image_id in enumerate(ids):
        store.put(image_id, _label(index))
    for index, image_id in enumerate(ids):
        assert np.array_equal(store.get(image_id), _label(index))
    # same basename in two "cities": two distinct files, one single-channel palette PNG each
    files = {store.entries()[image_id]["file"] for image_id in ids}
    assert len(files) == len(ids)
    png = Image.open(tmp_path / "store" / store.entries()["train/aachen/x_000001"]["file"])
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]
    assert store.pending(ids) == []
    store.verify(ids)
    manifest = json.loads((tmp_path / "store" / MANIFEST_FILE).read_text())
    assert set(manifest["entries"]) == set(ids)
    assert set(manifest["entries"]["a"]) >= {"file", "size", "sha256", "height", "width"}


def test_put_rejects_bad_label_maps(tmp_path):
    store = PseudoLabelStore(tmp_path)
    with pytest.raises(ValueError, match=r"must be \[H, W\]"):
        store.put("x", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="integers in"):
        store.put("x", np.full((2, 3), 300))
    with pytest.raises(ValueError, match="integers in"):
        store.put("x", np.zeros((2, 3), np.float32))


def test_resume_redoes_only_missing_or_corrupt(tmp_path):
    store = PseudoLabelStore(tmp_path / "s")
    ids = [f"img{i}" for i in range(6)]
    for image_id in ids[:4]:
        store.put(image_id, _label(1))
    # corrupt one file (same size, other bytes), truncate another
    entries = store.entries()
    corrupt = tmp_path / "s" / entries["img1"]["file"]
    payload = bytearray(corrupt.read_bytes())
    payload[-20] ^= 0xFF
    corrupt.write_bytes(bytes(payload))
    truncated = tmp_path / "s" / entries["img2"]["file"]
    truncated.write_bytes(truncated.read_bytes()[:10])
    reopened = PseudoLabelStore(tmp_path / "s")
    assert reopened.pending(ids) == ["img1", "img2", "img4", "img5"]
    with pytest.raises(ValueError, match="4 of 6 labels unusable.*'img1': file .* checksum.*'img2': file .* bytes"):
        reopened.verify(ids)
    for image_id in reopened.pending(ids):
        reopened.put(image_id, _label(2))
    reopened.verify(ids)
    assert np.array_equal(reopened.get("img1"), _label(2))
    assert np.array_equal(reopened.get("img0"), _label(1))


def test_missing_entry_and_file_are_errors_naming_the_id(tmp_path):
    store = PseudoLabelStore(tmp_path)
    store.put("present", _label(0))
    with pytest.raises(KeyError, match="'absent'"):
        store.get("absent")
    with pytest.raises(ValueError, match="'absent': no manifest entry"):
        store.verify(["present", "absent"])
    (tmp_path / store.entries()["present"]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="'present'"):
        PseudoLabelStore(tmp_path).get("present")


def test_concurrent_writers_and_torn_journal_line(tmp_path):
    """Two processes' stores write disjoint ids into one directory; a reader sees all of them.
    A writer killed mid-line leaves a torn last line: that entry is simply still pending."""
    first, second = PseudoLabelStore(tmp_path), PseudoLabelStore(tmp_path)
    first.put("a", _label(0))
    second.put("b", _label(1))
    first.put("c", _label(2))
    journals = sorted(tmp_path.glob("journal-*.jsonl"))
    assert len(journals) == 2
    with open(journals[0], "a") as stream:
        stream.write('{"id": "d", "file": "labels/d.pn')
    reader = PseudoLabelStore(tmp_path)
    assert reader.pending(["a", "b", "c", "d"]) == ["d"]
    reader.put("d", _label(3))
    reader.verify(["a", "b", "c", "d"])
    # the consolidated manifest alone is enough once the journals are gone
    for journal in tmp_path.glob("journal-*.jsonl"):
        journal.unlink()
    assert np.array_equal(PseudoLabelStore(tmp_path).get("b"), _label(1))


def test_no_temporary_files_left(tmp_path):
    store = PseudoLabelStore(tmp_path)
    store.put("x", _label(0))
    store.verify(["x"])
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


def test_teacher_fingerprint_keys_the_store(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights-1")
    (teacher / "config.json").write_text("{}")
    fingerprint = teacher_fingerprint(teacher)
    store = PseudoLabelStore.for_teacher(tmp_path / "labels", fingerprint, "label_reliable")
    store.put("x", _label(0))
    assert store.directory.name == f"label_reliable-{fingerprint[:16]}"
    (teacher / "model.safetensors").write_bytes(b"weights-2")
    other = teacher_fingerprint(teacher)
    assert other != fingerprint
    with pytest.raises(ValueError, match="holds pseudo labels of teacher"):
        PseudoLabelStore(store.directory, fingerprint=other)
    assert PseudoLabelStore(store.directory, fingerprint=fingerprint).pending(["x"]) == []


def test_store_pickles_for_dataloader_workers(tmp_path):
    store = PseudoLabelStore(tmp_path)
    store.put("x", _label(0))
    copy = pickle.loads(pickle.dumps(store))
    assert np.array_equal(copy.get("x"), _label(0))
    copy.put("y", _label(1))  # its own journal, not the parent's
    assert len(list(tmp_path.glob("journal-*.jsonl"))) == 2
    assert store.pending(["x", "y"]) == []


@pytest.mark.parametrize("torn", [b'{"version": 1, "entr', b"\xff\xfe garbage", b'{"entries": ["a"]}'])
def test_a_torn_manifest_is_rebuilt_from_the_journals(tmp_path, torn):
    store = PseudoLabelStore.for_teacher(tmp_path, "f" * 64, "label_all")
    for index, image_id in enumerate(["a", "b"]):
        store.put(image_id, _label(index))
    store.verify(["a", "b"])
    manifest = (store.directory / MANIFEST_FILE).read_bytes()
    (store.directory / MANIFEST_FILE).write_bytes(torn)
    reopened = PseudoLabelStore.for_teacher(tmp_path, "f" * 64, "label_all")
    assert reopened.pending(["a", "b"]) == [] and np.array_equal(reopened.get("b"), _label(1))
    reopened.verify(["a", "b"])
    assert (store.directory / MANIFEST_FILE).read_bytes() == manifest


def test_a_torn_store_header_is_rewritten_for_a_known_teacher_and_named_otherwise(tmp_path):
    store = PseudoLabelStore.for_teacher(tmp_path, "f" * 64, "label_all")
    store.put("a", _label(0))
    (store.directory / "store.json").write_text('["not", "a", "header"]')
    with pytest.raises(
        ValueError, match=r"store.json is not a pseudo-label store header.*delete .*label_all-f{16} to label"
    ):
        PseudoLabelStore(store.directory)  # reading a store whose teacher is unknown
    reopened = PseudoLabelStore.for_teacher(tmp_path, "f" * 64, "label_all")
    assert json.loads((store.directory / "store.json").read_text())["fingerprint"] == "f" * 64
    assert np.array_equal(reopened.get("a"), _label(0))


def _filesystem_calls(monkeypatch, function) -> dict[str, int]:
    """How many times ``function()`` calls ``os.stat``, ``os.lstat``, ``os.scandir`` and ``open``."""
    import builtins
    import os

    counts = dict.fromkeys(("stat", "lstat", "scandir", "open"), 0)
    for module, name in ((os, "stat"), (os, "lstat"), (os, "scandir"), (builtins, "open")):
        original = getattr(module, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    try:
        function()
    finally:
        monkeypatch.undo()
    return counts


@pytest.mark.parametrize("depth", [1, 12])
def test_checking_does_fixed_filesystem_work_per_id(tmp_path, monkeypatch, depth):
    """pending + verify of n ids list the store's directory a fixed number of times and touch each label file a
    fixed number of times, whatever n and however deep the store lies (no per-id resolving of the whole path)."""
    directory = tmp_path.joinpath(*[f"level{index}" for index in range(depth)], "store")
    calls = {}
    for count in (3, 7):
        store = PseudoLabelStore(directory / str(count))
        ids = [f"id{index}" for index in range(count)]
        for index, image_id in enumerate(ids):
            store.put(image_id, _label(index))
        store = PseudoLabelStore(directory / str(count))

        def check(store=store, ids=ids):
            assert store.pending(ids) == []
            store.verify(ids)

        calls[count] = _filesystem_calls(monkeypatch, check)
    per_id = {name: (calls[7][name] - calls[3][name]) / 4 for name in calls[3]}
    # each check: is the file a symlink, is it a file, its size (Python 3.11's pathlib: 3 os.stat, no os.lstat)
    assert per_id["stat"] + per_id["lstat"] <= 6, (calls, per_id)
    assert (per_id["open"], per_id["scandir"]) == (2, 0), (calls, per_id)


def test_a_symlinked_label_file_must_resolve_into_the_store(tmp_path):
    store = PseudoLabelStore(tmp_path / "store")
    store.put("a", _label(0))
    store.put("b", _label(1))
    outside = tmp_path / "outside.png"
    label_file = tmp_path / "store" / store.entries()["b"]["file"]
    outside.write_bytes(label_file.read_bytes())
    label_file.unlink()
    label_file.symlink_to(outside)
    assert PseudoLabelStore(tmp_path / "store").pending(["a", "b"]) == ["b"]
    inside = tmp_path / "store" / "labels" / "copy.png"
    outside.rename(inside)
    label_file.unlink()
    label_file.symlink_to(inside)
    assert PseudoLabelStore(tmp_path / "store").pending(["a", "b"]) == []
