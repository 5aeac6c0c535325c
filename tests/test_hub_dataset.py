"""A ``datasets`` segmentation dataset (local directory, and a Hub repo on the fake Hub) as the source of a run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fake_hub import FakeHub
from helpers import REPO, SCRIPT
from PIL import Image
from segmentation_repo import CLASS_NAMES, png_field, segmentation_repo_files, write_repo

from stpp_hf.data.hub.loading import load_hub_sources
from stpp_hf.data.hub.partition import parse_fraction
from stpp_hf.data.splits import write_split


def load(directory, partition_dir, cache_dir, **kwargs):
    kwargs.setdefault("labeled_fraction", "1/4")
    return load_hub_sources(str(directory), partition_dir, cache_dir=cache_dir, **kwargs)


@pytest.fixture(scope="module")
def local_repo(tmp_path_factory):
    return write_repo(tmp_path_factory.mktemp("segdata"), segmentation_repo_files())


def test_local_directory_parts_features_and_partition(local_repo, tmp_path):
    sources = load(local_repo, tmp_path / "partition", tmp_path / "cache", partition_seed=3)
    assert (
        set(sources.labeled.features)
        == set(sources.unlabeled.features)
        == set(sources.val.features)
        == {"id", "image", "label"}
    )
    assert len(sources.labeled) == 6 and len(sources.unlabeled) == 18 and len(sources.val) == 6  # 1/4 of 24 rows
    labeled_ids, unlabeled_ids = set(sources.labeled["id"]), list(sources.unlabeled["id"])
    assert not labeled_ids & set(unlabeled_ids) and len(labeled_ids | set(unlabeled_ids)) == 24
    assert {"train/000003", "train/000007"} <= set(unlabeled_ids)  # rows without a label are never labeled
    assert sources.unlabeled[unlabeled_ids.index("train/000003")]["label"] is None
    assert sources.unlabeled_split is None and not sources.unlabeled_have_masks  # rows 3 and 7 have no label
    assert sources.id2label == dict(enumerate(CLASS_NAMES))
    assert sources.palette[:9] == [0, 0, 0, 200, 30, 30, 30, 30, 200]  # the label PNGs' own palette
    assert sources.metadata["hub_dataset"]["label_column"] == "annotation"  # 'label' is absent: the examples' fallback
    # the rows are the dataset's rows, pixel for pixel
    from datasets import load_dataset

    raw = load_dataset(str(local_repo), split="train", cache_dir=str(tmp_path / "cache"))
    row = sources.labeled[0]
    index = int(row["id"].split("/")[1])
    assert np.array_equal(np.asarray(row["label"]), np.asarray(raw[index]["annotation"]))
    assert np.array_equal(np.asarray(row["image"]), np.asarray(raw[index]["image"]))
    # written as split files; another seed draws another partition
    assert (tmp_path / "partition" / "labeled.txt").read_text().split("\n")[0].startswith("train/")
    other = load(local_repo, tmp_path / "other", tmp_path / "cache", partition_seed=4)
    assert set(other.labeled["id"]) != labeled_ids


def test_subset_files_of_hub_data_are_row_ids_and_an_earlier_versions_lines_read_back(local_repo, tmp_path):
    data = load(local_repo, tmp_path / "partition", tmp_path / "cache")
    ids = data.unlabeled_ids[:3]
    subset = tmp_path / "reliable_ids.txt"
    write_split(subset, [data.unlabeled_lines[image_id] for image_id in ids])
    assert subset.read_text() == "".join(f"{image_id}\n" for image_id in ids)  # one row id per line
    assert data.ids_of_lines(subset) == ids
    subset.write_text("".join(f"{image_id} {image_id}/annotation\n" for image_id in ids))  # as written before
    assert data.ids_of_lines(subset) == ids
    subset.write_text("train/999999\n")
    with pytest.raises(ValueError, match="not in the unlabeled split"):
        data.ids_of_lines(subset)


def test_relaunch_reuses_the_partition_and_refuses_other_options(local_repo, tmp_path):
    first = load(local_repo, tmp_path / "partition", tmp_path / "cache", num_labeled=5, labeled_fraction=None)
    labeled_file = (tmp_path / "partition" / "labeled.txt").read_text()
    again = load(local_repo, tmp_path / "partition", tmp_path / "cache", num_labeled=5, labeled_fraction=None)
    assert list(again.labeled["id"]) == list(first.labeled["id"])
    assert (tmp_path / "partition" / "labeled.txt").read_text() == labeled_file
    with pytest.raises(ValueError, match="partition_seed: recorded 0, now 1"):
        load(
            local_repo,
            tmp_path / "partition",
            tmp_path / "cache",
            num_labeled=5,
            labeled_fraction=None,
            partition_seed=1,
        )
    with pytest.raises(ValueError, match="num_labeled: recorded 5, now 6"):
        load(local_repo, tmp_path / "partition", tmp_path / "cache", num_labeled=6, labeled_fraction=None)


IDENTITY = textwrap.dedent(
    """
    import json, sys
    from stpp_hf.data.hub.loading import load_hub_sources

    repo, partition_dir, cache_dir = sys.argv[1:]
    print(json.dumps(load_hub_sources(repo, partition_dir, cache_dir=cache_dir, labeled_fraction="1/4").identity))
    """
)


def test_the_data_identity_is_the_rows_content(local_repo, tmp_path):
    first = load(local_repo, tmp_path / "partition", tmp_path / "cache")
    # the same rows loaded in a new process into a new cache: the same record
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", IDENTITY, str(local_repo), str(tmp_path / "again"), str(tmp_path / "cache2")]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == first.identity
    assert {part: first.identity[part]["num_images"] for part in ("labeled", "unlabeled", "val")} == {
        "labeled": 6, "unlabeled": 18, "val": 6,
    }  # fmt: skip
    # one labeled row's label mirrored (same classes: the same partition is drawn) and the image of a row without a
    # label replaced: those parts only get another record
    from datasets import load_dataset

    raw = load_dataset(str(local_repo), split="train", cache_dir=str(tmp_path / "cache"))
    labeled_row = int(first.labeled[0]["id"].split("/")[1])
    mirrored = raw[labeled_row]["annotation"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    extra = {labeled_row: {"annotation": png_field(mirrored)}, 3: {"image": png_field(Image.new("RGB", (12, 10)))}}
    changed_repo = write_repo(tmp_path / "changed", segmentation_repo_files(extra=extra))
    changed = load(changed_repo, tmp_path / "changed-partition", tmp_path / "cache")
    assert list(changed.labeled["id"]) == list(first.labeled["id"])
    differing = {part for part in ("labeled", "unlabeled", "val") if changed.identity[part] != first.identity[part]}
    assert differing == {"labeled", "unlabeled"}
    assert changed.identity["id2label"] == first.identity["id2label"]


def test_fractions():
    assert parse_fraction("1/16") == parse_fraction("0.0625") == parse_fraction(0.0625) == 0.0625
    for bad in ("1/0", "half", "1", "0"):
        with pytest.raises(ValueError, match="labeled_fraction"):
            parse_fraction(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(labeled_fraction="1/100"), "0 labeled of the 24 rows of .* leaves no labeled image"),
        (dict(num_labeled=24, labeled_fraction=None), "24 labeled of the 24 rows .* leaves no unlabeled image"),
        (dict(num_labeled=23, labeled_fraction=None), "only 22 rows have a label"),
        (dict(num_labeled=5), "give --num_labeled or --labeled_fraction, not both"),
        (
            dict(label_column="mask"),
            "split 'train' has no label column 'mask' \\(columns: image, annotation, caption\\)",
        ),
        (dict(image_column="picture"), "has no image column 'picture'"),
        (
            dict(label_column="caption"),
            "column 'caption' is Value.*not an Image feature; the label column must hold a class-index mask",
        ),
        (dict(val_split="test"), "has no split 'test'"),
    ],
)
def test_bad_options_are_named(local_repo, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load(local_repo, tmp_path / "partition", tmp_path / "cache", **kwargs)


def _bad_label(tmp_path, label: Image.Image, expected: str):
    files = segmentation_repo_files(extra={0: {"annotation": png_field(label)}})
    directory = write_repo(tmp_path / "bad", files)
    with pytest.raises(ValueError, match=expected):
        load(directory, tmp_path / "partition", tmp_path / "cache")


def test_label_of_another_size_names_the_row(tmp_path):
    _bad_label(
        tmp_path,
        Image.new("L", (5, 5)),
        "split 'train', row 0: image is 12x10 but its label \\('annotation'\\) is 5x5",
    )


def test_label_values_outside_the_classes_name_the_row(tmp_path):
    _bad_label(
        tmp_path, Image.new("L", (12, 10), 7), "row 0, column 'annotation': mask values \\[7\\] are outside \\[0, 3\\)"
    )


def test_colour_label_names_the_row(tmp_path):
    _bad_label(tmp_path, Image.new("RGB", (12, 10)), "row 0, column 'annotation': the label has mode 'RGB'")


def test_class_names_need_id2label(tmp_path):
    directory = write_repo(tmp_path / "noid", segmentation_repo_files(with_id2label=False))
    with pytest.raises(FileNotFoundError, match="ships no id2label.json to name its classes; pass --id2label FILE"):
        load(directory, tmp_path / "partition", tmp_path / "cache")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "void", "1": "a", "2": "b", "3": "c"}))
    sources = load(directory, tmp_path / "partition", tmp_path / "cache", id2label_file=names)
    assert sources.id2label == {0: "void", 1: "a", 2: "b", 3: "c"}


HUB_LOADER = textwrap.dedent(
    """
    import json, sys
    from stpp_hf.data.hub import loading
    from stpp_hf.data.hub.loading import load_hub_sources
    from stpp_hf.data.images import open_image, undecoded

    repo_id, partition_dir, cache_dir = sys.argv[1:]
    loaded_revisions = []

    def load_dataset(*args, load=loading.load_dataset, **kwargs):
        loaded_revisions.append(kwargs.get("revision"))
        return load(*args, **kwargs)

    loading.load_dataset = load_dataset
    report = {"loaded_revisions": loaded_revisions}
    for streaming in (False, True):
        sources = load_hub_sources(repo_id, partition_dir, labeled_fraction="1/6", partition_seed=1,
                                   streaming=streaming, cache_dir=cache_dir)
        unlabeled = list(sources.unlabeled.rows(sources.unlabeled.ids) if streaming else undecoded(sources.unlabeled))
        report[str(streaming)] = {
            "labeled": list(sources.labeled["id"]), "val": len(sources.val), "id2label": sources.id2label,
            "unlabeled": [row["id"] for row in unlabeled],
            "unlabeled_sizes": [list(open_image(row["image"]).size) for row in unlabeled],
            "unlabeled_has_label": [row["label"] is not None for row in unlabeled],
            "type": type(sources.unlabeled).__name__, "revision": sources.metadata["hub_dataset"]["revision"],
            "unlabeled_revision": sources.identity["unlabeled"].get("revision"),
        }
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_load_from_the_fake_hub_with_and_without_streaming(tmp_path):
    with FakeHub() as hub:
        hub.add_repo("tester/tiny-seg", segmentation_repo_files(), repo_type="dataset")
        environment = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
                       "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                       "PYTHONPATH": str(REPO)}  # fmt: skip
        environment.pop("HF_HUB_OFFLINE", None)
        completed = subprocess.run(
            [sys.executable, "-c", HUB_LOADER, "tester/tiny-seg", str(tmp_path / "partition"),
             str(tmp_path / "cache")],
            env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert not [request for request in hub.unhandled if "/datasets/" in request], hub.unhandled
        commit = hub.repos["datasets/tester/tiny-seg"].branches["main"][0]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    eager, streamed = report["False"], report["True"]
    assert report["loaded_revisions"] == [commit] * 4  # each split, each way, loaded at the commit recorded
    assert len(eager["labeled"]) == 4 and eager["val"] == 6 and len(eager["unlabeled"]) == 20
    assert eager["id2label"] == {
        str(index): name for index, name in enumerate(CLASS_NAMES)
    }  # the repo's id2label.json
    assert streamed["type"] == "UnlabeledStream" and eager["type"] == "Dataset"
    for key in ("labeled", "unlabeled", "unlabeled_sizes", "unlabeled_has_label"):
        assert streamed[key] == eager[key], key
    assert eager["unlabeled_has_label"].count(False) == 2
    # the Hub commit the dataset was loaded at: in results.json's hub_dataset, and in the streamed part's record
    assert eager["revision"] == streamed["revision"] == streamed["unlabeled_revision"] == commit
    assert eager["unlabeled_revision"] is None  # an in-memory part is identified by its content


def hub_environment(hub: FakeHub, home: Path) -> dict:
    environment = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                   "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # fmt: skip
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ACCELERATE_USE_CPU"):
        environment.pop(name, None)
    return environment


TRAIN_ARGS = [
    "--dataset_name", "tester/tiny-seg", "--labeled_fraction", "1/4", "--partition_seed", "2", "--framework", "stpp",
    "--backbone", "resnet18", "--output_stride", "16", "--epochs", "3", "--global_batch_size", "4",
    "--crop_size", "32", "--base_size", "32", "--inference_batch_size", "4", "--val_batch_size", "6", "--lr", "0.02",
    "--report_to", "none",
    "--backbone_weights", "none",  # a random ResNet-18: no ImageNet weights to download in a test
]  # fmt: skip


EXPORT = textwrap.dedent(
    """
    import json, sys
    from stpp_hf.training.pseudo_label_export import pseudo_label_dataset

    pseudo = pseudo_label_dataset(sys.argv[1])
    print(json.dumps({"ids": list(pseudo["id"]), "subsets": list(pseudo["subset"]),
                      "sizes": [list(row["pseudo_label"].size) for row in pseudo]}))
    """
)


@pytest.mark.slow
def test_stpp_trains_on_a_fake_hub_dataset(tmp_path):
    run = tmp_path / "run"
    with FakeHub() as hub:
        hub.add_repo("tester/tiny-seg", segmentation_repo_files(size=(32, 24)), repo_type="dataset")
        environment = hub_environment(hub, tmp_path / "home")
        command = [sys.executable, str(SCRIPT), "--output_dir", str(run)]
        completed = subprocess.run(
            [*command, *TRAIN_ARGS], env=environment, capture_output=True, text=True, timeout=400
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
        # the same run with the unlabeled rows streamed
        streamed = subprocess.run(
            [*command[:-1], str(tmp_path / "streamed"),
             *TRAIN_ARGS, "--streaming", "true"],
            env=environment, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert streamed.returncode == 0, streamed.stdout[-3000:] + streamed.stderr[-5000:]
        # a relaunch with another partition seed is refused before anything is trained
        refused = subprocess.run(
            [*command, *TRAIN_ARGS, "--partition_seed", "3"],  # the last occurrence wins
            env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        # the run's pseudo labels as a dataset, the images read again from the Hub dataset
        exported = subprocess.run(
            [sys.executable, "-c", EXPORT, str(run)], env=environment, capture_output=True, text=True, timeout=300
        )
        assert exported.returncode == 0, exported.stderr[-3000:]
    # the whole-configuration check refuses it, before the partition files are read
    assert refused.returncode != 0 and "hub_dataset.partition_seed: 2 -> 3" in refused.stderr
    export = json.loads(exported.stdout.strip().splitlines()[-1])
    unlabeled = (run / "partition" / "unlabeled.txt").read_text().split("\n")
    assert export["ids"] == [line.split()[0] for line in unlabeled if line]
    assert sorted(set(export["subsets"])) == ["reliable", "unreliable"] and export["sizes"] == [[32, 24]] * 18
    results = json.loads((run / "results.json").read_text())
    assert results["dataset"] == "tester/tiny-seg" and results["split"] == "train: 1/4 labeled, seed 2"
    assert results["hub_dataset"]["label_column"] == "annotation"
    assert results["hub_dataset"]["partition"] == {
        "train_split": "train", "num_labeled": None, "labeled_fraction": "1/4", "partition_seed": 2, "num_rows": 24,
    }  # fmt: skip
    assert (results["num_labeled"], results["num_unlabeled"]) == (6, 18)
    assert results["id2label"] == {str(index): name for index, name in enumerate(CLASS_NAMES)}
    labeled = (run / "partition" / "labeled.txt").read_text().split()
    assert len(labeled) == 6 and labeled[0].startswith("train/")  # 6 row ids
    # pseudo labels carry the dataset's palette; their mIoU is measured on the unlabeled rows that have a mask
    store = next((run / "pseudo_labels").glob("label_reliable-*"))
    pseudo = Image.open(next((store / "labels").glob("*.png")))
    assert pseudo.mode == "P" and pseudo.getpalette()[:9] == [0, 0, 0, 200, 30, 30, 30, 30, 200]
    assert all(0 <= miou <= 1 for miou in results["pseudo_label_miou"].values())
    assert results["stages"][1]["teacher_miou"] is None  # not every unlabeled row has a mask to compare with
    # streaming selects the same images and writes the same pseudo labels, byte for byte
    for name in ("partition/labeled.txt", "stages/2-select/reliable_ids.txt", "stages/2-select/reliability.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (run / name).read_bytes(), name
    eager_labels = sorted((run / "pseudo_labels").rglob("*.png"))
    assert len(eager_labels) == 18
    for path in eager_labels:
        assert (tmp_path / "streamed" / path.relative_to(run)).read_bytes() == path.read_bytes()
    streamed_results = json.loads((tmp_path / "streamed" / "results.json").read_text())
    assert streamed_results["config"]["hub_dataset"]["streaming"] is True
    assert streamed_results["pseudo_label_miou"] == results["pseudo_label_miou"]
    assert len(list((tmp_path / "streamed" / "streamed_unlabeled" / "images" / "labels").glob("*.png"))) == 18


class Killed(Exception):
    pass


@pytest.fixture
def killed_hub_run(monkeypatch, tmp_path):
    """``launch(run_dir, repo)``: ``cli.main`` on a local dataset directory with the stages replaced by a kill."""
    import datasets

    from stpp_hf.training import cli

    def kill(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(cli, "run_pipeline", kill)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))

    def launch(run_dir, repo, *extra):
        cli.main(["--output_dir", str(run_dir), "--dataset_name", str(repo), "--num_labeled", "5",
                  "--report_to", "none", "--backbone_weights", "none", *extra])  # fmt: skip

    return launch


def test_a_run_directory_of_the_earlier_version_is_refused_saying_what_to_do_then_resumes(
    local_repo, tmp_path, killed_hub_run
):
    """The earlier version recorded ``datasets``' cache fingerprints as the data section and wrote the partition
    files as ``<id> <id>/<label column>`` lines."""
    from stpp_hf.training.errors import ConfigError

    run = tmp_path / "run"

    def launch():
        with pytest.raises(Killed):
            killed_hub_run(run, local_repo)

    launch()
    current = json.loads((run / "run_config.json").read_text())
    assert set(current["data"]["labeled"]) == {"content_sha256", "num_images"}
    earlier = {part: {"fingerprint": "0123abcd", "num_images": current["data"][part]["num_images"]}
               for part in ("labeled", "unlabeled", "val")}  # fmt: skip
    earlier["id2label"] = current["data"]["id2label"]
    (run / "run_config.json").write_text(json.dumps({**current, "data": earlier}))
    # an earlier version's state.json kept a copy of the settings: ignored
    (run / "state.json").write_text(
        json.dumps({"version": 1, "run_config": {**current, "data": earlier}, "stages": {}})
    )
    for part in ("labeled", "unlabeled"):
        path = run / "partition" / f"{part}.txt"
        ids = path.read_text().split()
        path.write_text("".join(f"{image_id} {image_id}/annotation\n" for image_id in ids))
    with pytest.raises(ConfigError, match="earlier version") as refused:
        killed_hub_run(run, local_repo)
    assert 'delete the "data" section' in str(refused.value)
    assert json.loads((run / "run_config.json").read_text())["data"] == earlier  # a refusal changes nothing
    # done as told: the data is recorded by content, the partition files of the earlier format read as they are
    (run / "run_config.json").write_text(json.dumps({key: value for key, value in current.items() if key != "data"}))
    launch()
    assert json.loads((run / "run_config.json").read_text())["data"] == current["data"]
    assert (run / "partition" / "labeled.txt").read_text().split()[1].endswith("/annotation")


def test_a_relaunch_on_changed_rows_is_refused_naming_the_part(tmp_path, killed_hub_run):
    from stpp_hf.training.errors import ConfigError

    repo, run = write_repo(tmp_path / "repo", segmentation_repo_files()), tmp_path / "run"
    with pytest.raises(Killed):
        killed_hub_run(run, repo)
    with pytest.raises(Killed):
        killed_hub_run(run, repo)  # the same rows resume
    saved = (run / "run_config.json").read_text()
    # row 3 has no label: always unlabeled, so the partition stays and only the unlabeled part differs
    write_repo(repo, segmentation_repo_files(extra={3: {"image": png_field(Image.new("RGB", (12, 10)))}}))
    with pytest.raises(ConfigError, match="already holds a run on other rows of the dataset") as refused:
        killed_hub_run(run, repo)
    assert "unlabeled: " in str(refused.value) and "labeled: " not in str(refused.value).replace("unlabeled: ", "")
    assert (run / "run_config.json").read_text() == saved


def test_a_streamed_run_records_the_revision_and_refuses_another(local_repo, tmp_path, killed_hub_run):
    """A streamed part is identified by its row ids and the dataset's revision (``None`` for a local directory); a
    record saved before the revision was is compared by its row ids."""
    from stpp_hf.training.errors import ConfigError

    run = tmp_path / "run"

    def launch():
        with pytest.raises(Killed):
            killed_hub_run(run, local_repo, "--streaming", "true")

    def edit_saved(edit):
        record = json.loads((run / "run_config.json").read_text())
        edit(record["data"]["unlabeled"])
        (run / "run_config.json").write_text(json.dumps(record))

    launch()
    saved = json.loads((run / "run_config.json").read_text())["data"]["unlabeled"]
    assert saved["revision"] is None and set(saved) == {"ids_sha256", "num_images", "revision"}
    edit_saved(lambda unlabeled: unlabeled.pop("revision"))
    launch()  # saved without a revision: the same row ids resume
    edit_saved(lambda unlabeled: unlabeled.update(revision="0123abcd"))
    with pytest.raises(ConfigError, match="other rows of the dataset .*dataset changed since") as refused:
        killed_hub_run(run, local_repo, "--streaming", "true")
    assert str(local_repo) in str(refused.value) and "'revision': '0123abcd'} -> " in str(refused.value)


def test_the_revision_is_the_hub_commit_and_none_for_a_local_directory(local_repo, tmp_path, monkeypatch):
    import huggingface_hub

    from stpp_hf.data.hub.identity import dataset_revision

    with FakeHub() as hub:
        hub.add_repo("tester/tiny-seg", segmentation_repo_files(), repo_type="dataset")
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        commit = hub.repos["datasets/tester/tiny-seg"].branches["main"][0]
        assert dataset_revision("tester/tiny-seg") == commit
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        assert dataset_revision("tester/tiny-seg") is None  # offline: not learnt, not an error

    def no_network(*args, **kwargs):
        raise AssertionError("a local dataset asks the Hub nothing")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_network)
    assert dataset_revision(str(local_repo)) is None
    sources = load(local_repo, tmp_path / "partition", tmp_path / "cache")
    assert sources.metadata["hub_dataset"]["revision"] is None  # results.json's hub_dataset
