"""``--streaming``: the unlabeled rows of a ``datasets`` split read lazily, sharded, copied for retraining; the
stratified partition; class names from a per-pixel ``ClassLabel``. Local dataset directories, no network."""

import json
import subprocess

import numpy as np
import pytest
from datasets import ClassLabel, Features, Image, Sequence, Value
from helpers import REPO, assert_ok, launch_command
from PIL import Image as PILImage
from segmentation_repo import CLASS_NAMES, png_field, segmentation_repo_files, write_repo

from stpp_hf.data import StreamedEvalDataset
from stpp_hf.data.hub.classes import class_label_names, resolve_id2label
from stpp_hf.data.hub.loading import load_hub_sources
from stpp_hf.data.hub.partition import rarest_class_strata
from stpp_hf.data.images import open_image
from stpp_hf.training.config import resolve_run_config, validate_arguments
from stpp_hf.training.errors import ConfigError
from stpp_hf.training.options import parse_arguments
from stpp_hf.training.run_record import config_differences


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_repo(tmp_path_factory.mktemp("segdata"), segmentation_repo_files())


def load(repo, tmp_path, streaming, **kwargs):
    kwargs.setdefault("labeled_fraction", "1/4")
    return load_hub_sources(
        str(repo), tmp_path / f"partition-{streaming}", cache_dir=tmp_path / "cache", streaming=streaming, **kwargs
    )


def undecoded_bytes(value) -> np.ndarray:
    return np.asarray(open_image(value))


def test_streaming_draws_the_same_partition_and_rows(repo, tmp_path):
    eager, streamed = (load(repo, tmp_path, streaming, partition_seed=5) for streaming in (False, True))
    for name in ("labeled.txt", "unlabeled.txt", "partition.json"):
        assert (tmp_path / "partition-True" / name).read_text() == (tmp_path / "partition-False" / name).read_text()
    assert list(streamed.labeled["id"]) == list(eager.labeled["id"])
    assert streamed.unlabeled.ids == list(eager.unlabeled["id"]) and len(streamed.unlabeled) == 18
    assert streamed.unlabeled_split is None and not streamed.unlabeled_have_masks  # Hub data: its ids are the lines
    assert (streamed.id2label, streamed.palette, streamed.metadata) == (eager.id2label, eager.palette, eager.metadata)
    for part in ("labeled", "val"):
        for mine, theirs in zip(getattr(streamed, part), getattr(eager, part)):
            assert mine["id"] == theirs["id"]
            assert np.array_equal(np.asarray(mine["image"]), np.asarray(theirs["image"]))
            assert np.array_equal(np.asarray(mine["label"]), np.asarray(theirs["label"]))
    # the unlabeled rows, read lazily, are the in-memory ones (a row without a label has label None)
    eager_rows = {row["id"]: row for row in eager.unlabeled}
    rows = list(streamed.unlabeled.rows(streamed.unlabeled.ids))
    assert [row["id"] for row in rows] == streamed.unlabeled.ids
    for row in rows:
        assert np.array_equal(undecoded_bytes(row["image"]), np.asarray(eager_rows[row["id"]]["image"]))
        assert (row["label"] is None) == (eager_rows[row["id"]]["label"] is None)


def test_processes_read_disjoint_shards_and_fetches_resume(repo, tmp_path):
    stream = load(repo, tmp_path, True).unlabeled
    ids = stream.ids[::-1]  # any order: read in row order
    shards = [[row["id"] for row in stream.rows(ids, rank, 2)] for rank in (0, 1)]
    assert shards == [stream.ids[0::2], stream.ids[1::2]]
    # process 1 was killed before copying anything: a relaunch on one process copies only what is missing
    copies = tmp_path / "copies"
    assert stream.fetch(ids, copies, rank=0, world_size=2) == 9
    with pytest.raises(ValueError, match="9 of 18 labels unusable"):
        stream.verify(ids, copies)
    victim = stream.ids[0]
    images, _ = stream.stores(copies)
    images.file_path(victim).write_bytes(b"torn")  # a damaged copy is copied again
    assert stream.fetch(ids, copies) == 10 and stream.fetch(ids, copies) == 0
    stream.verify(ids, copies)
    journals = [
        json.loads(line)["id"]
        for path in (copies / "images").glob("journal-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted(journals) == sorted(stream.ids + [victim])  # each image copied once, the damaged one twice
    local = stream.local_dataset(ids, copies)
    assert list(local["id"]) == ids
    streamed = {row["id"]: row for row in stream.rows(ids)}
    for row in local.cast_column("image", Image(decode=False)).cast_column("label", Image(decode=False)):
        assert np.array_equal(undecoded_bytes(row["image"]), undecoded_bytes(streamed[row["id"]]["image"]))
        assert (row["label"] is None) == (streamed[row["id"]]["label"] is None)


def test_a_streamed_set_is_read_once_in_order(repo, tmp_path):
    stream = load(repo, tmp_path, True).unlabeled
    view = StreamedEvalDataset(stream, stream.ids[:6], rank=1, world_size=2)
    assert view[1][0].shape == (3, 10, 12) and view[3][0].shape == (3, 10, 12)
    with pytest.raises(IndexError, match="item 5 comes next, not 1"):
        view[1]


def test_a_bad_streamed_row_is_named_when_read(tmp_path):
    files = segmentation_repo_files(extra={2: {"annotation": png_field(PILImage.new("L", (12, 10), 9))}})
    stream = load(write_repo(tmp_path / "bad", files), tmp_path, True, num_labeled=1, labeled_fraction=None).unlabeled
    assert "train/000002" in stream.ids  # unlabeled, so only checked when the stream reaches it
    with pytest.raises(ValueError, match="split 'train', row 2, column 'annotation': mask values \\[9\\]"):
        list(stream.rows(stream.ids))


def test_streaming_bad_options_name_the_dataset(repo, tmp_path):
    with pytest.raises(ValueError, match="24 labeled of the 24 rows of .* leaves no unlabeled image"):
        load(repo, tmp_path, True, num_labeled=24, labeled_fraction=None)
    with pytest.raises(ValueError, match="has no split 'test'"):
        load(repo, tmp_path, True, val_split="test")
    data, model, run, _ = parse_arguments(["--streaming", "true"])
    with pytest.raises(ConfigError, match="--streaming .* needs --dataset_name"):
        validate_arguments(data, model, run)


def test_rarest_class_strata():
    assert rarest_class_strata([[0, 1], [0, 1, 2], [0, 255], [255], [1, 2]]) == [
        "0",
        "2",
        "0",
        "none",
        "2",
    ]  # ties: lower id


def test_the_draw_is_stratified_by_the_rarest_class(tmp_path):
    rng = np.random.default_rng(0)
    rare_rows = (0, 5, 10, 15)  # the only rows that show class 2
    extra = {}
    for row in range(24):
        mask = rng.integers(0, 2, size=(10, 12), dtype=np.uint8)
        if row in rare_rows:
            mask[0, 0] = 2
        extra[row] = {"annotation": png_field(PILImage.fromarray(mask))}
    repo = write_repo(tmp_path / "rare", segmentation_repo_files(unlabeled_rows=(), extra=extra))
    rare_ids = {f"train/{row:06d}" for row in rare_rows}
    for seed in range(8):  # 6 of 24 labeled: 4 * 6 / 24 = 1 rare row each time (a plain draw misses it 29% of draws)
        sources = load_hub_sources(
            str(repo), tmp_path / f"p{seed}", cache_dir=tmp_path / "cache", num_labeled=6, partition_seed=seed
        )
        assert len(rare_ids & set(sources.labeled["id"])) == 1, seed


def test_class_names_from_a_per_pixel_class_label(tmp_path):
    names = ClassLabel(names=["sky", "road"])
    per_pixel = Features({"image": Image(), "classes": Sequence(Sequence(names)), "scene": ClassLabel(names=["a"])})
    assert class_label_names(per_pixel) == ["sky", "road"]
    assert class_label_names(Features({"image": Image(), "scene": ClassLabel(names=["a", "b"])})) is None
    disagreeing = Features({"a": Sequence(names), "b": Sequence(ClassLabel(names=["x"])), "c": Value("int32")})
    bare, shipped = tmp_path / "bare", tmp_path / "shipped"
    bare.mkdir()
    write_repo(shipped, {"id2label.json": json.dumps(dict(enumerate(CLASS_NAMES))).encode()})
    assert resolve_id2label(str(bare), None, per_pixel) == {0: "sky", 1: "road"}
    with pytest.raises(ValueError, match="2 different per-pixel ClassLabel name lists; pass --id2label FILE"):
        resolve_id2label(str(bare), None, disagreeing)
    # precedence: --id2label, then the repo's id2label.json (which must agree in number), then the ClassLabel
    with pytest.raises(ValueError, match="id2label.json names 3 classes but its ClassLabel feature 2"):
        resolve_id2label(str(shipped), None, per_pixel)
    assert resolve_id2label(str(shipped), None, Features({"image": Image()})) == dict(enumerate(CLASS_NAMES))
    override = tmp_path / "names.json"
    override.write_text(json.dumps({"0": "void", "1": "thing"}))
    assert resolve_id2label(str(shipped), override, per_pixel) == {0: "void", 1: "thing"}
    with pytest.raises(FileNotFoundError, match="hold no per-pixel ClassLabel either"):
        resolve_id2label(str(bare), None, Features({"image": Image()}))


def test_a_relaunch_must_keep_streaming():
    """The outputs are the same, but the data record is not (a streamed part is fingerprinted by its dataset and
    row ids, an in-memory one by ``datasets``), and the run directory holds the streamed copies: recorded."""
    configs = []
    for extra in ([], ["--streaming", "true"]):
        data, model, run, _ = parse_arguments(["--dataset_name", "owner/name", "--num_labeled", "2", *extra])
        configs.append(json.loads(json.dumps(resolve_run_config(data, model, run, 1, "cpu").record())))
    assert config_differences(*configs) == [("hub_dataset.streaming", False, True)]


STREAM_SCRIPT = """
import json, sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from stpp_hf.data import EvalDataset, StreamedEvalDataset
from stpp_hf.data.hub.loading import load_hub_sources
from stpp_hf.models import build_model
from stpp_hf.training.selection import compute_reliability

repo, out = sys.argv[1], Path(sys.argv[2])
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
parts = {}
for streaming in (False, True):
    with accelerator.main_process_first():
        parts[streaming] = load_hub_sources(repo, out / "partition", cache_dir=out / "cache", labeled_fraction="1/4",
                                            streaming=streaming).unlabeled
stream = parts[True]
copied = stream.fetch(stream.ids, out / "copies", rank, world)
accelerator.wait_for_everyone()
snapshots = []
for seed in (0, 1):
    torch.manual_seed(seed)
    snapshots.append(build_model("deeplabv3plus", backbone="resnet18", output_stride=16, num_labels=3,
                                 aspp_channels=16, low_level_channels=8, decoder_channels=16).eval())
eager = compute_reliability(snapshots, EvalDataset(parts[False]), list(parts[False]["id"]), 3, accelerator, 4)
streamed = compute_reliability(snapshots, StreamedEvalDataset(stream, stream.ids, rank, world), stream.ids, 3,
                               accelerator, 4)
copies = gather_object([copied])
if accelerator.is_main_process:
    stream.verify(stream.ids, out / "copies")
    print("RESULT" + json.dumps({"copied": copies, "same_scores": eager == streamed, "num_scores": len(streamed)}))
accelerator.end_training()
"""


@pytest.mark.slow
def test_two_processes_stream_each_image_once_and_score_as_in_memory(repo, tmp_path):
    script = tmp_path / "stream.py"
    script.write_text(STREAM_SCRIPT)
    launch, env = launch_command(script, processes=2)
    env = dict(env, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [*launch, str(repo), str(tmp_path / "out")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert_ok(completed)
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    result = json.loads(line.removeprefix("RESULT"))
    assert result == {"copied": [9, 9], "same_scores": True, "num_scores": 18}
    journals = [
        json.loads(line)["id"]
        for path in (tmp_path / "out" / "copies" / "images").glob("journal-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(journals) == len(set(journals)) == 18  # every image copied exactly once, by one of the processes
