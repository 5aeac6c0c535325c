"""A run's identity is what changes its results, by content: data files by their bytes (not paths or mtimes), the
run directory free to move, the initialisation file by its content, the batch layout free while the global batch
stays; a refusal names what differs and changes nothing in the run directory."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import assert_ok, run_script
from PIL import Image

from stpp_hf.data.sources import get_source
from stpp_hf.data.sources.base import fingerprint
from stpp_hf.data.splits import read_split_text
from stpp_hf.training import cli
from stpp_hf.training.config import resolve_run_config
from stpp_hf.training.errors import ConfigError
from stpp_hf.training.options import parse_arguments
from stpp_hf.training.run_record import check_and_record_run_config, config_differences
from stpp_hf.training.state import STATE_VERSION, RunState

SYNTHETIC = ["--synthetic_num_labeled", "4", "--synthetic_num_unlabeled", "4", "--synthetic_num_val", "2",
             "--synthetic_image_size", "32", "--report_to", "none"]  # fmt: skip


class Killed(Exception):
    pass


@pytest.fixture
def killed_before_training(monkeypatch):
    """``cli.main`` with the stages replaced by a kill: a launch that built its data and checked the run directory."""

    def kill(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(cli, "run_pipeline", kill)

    def launch(run_dir, *extra):
        with pytest.raises(Killed):
            cli.main(["--output_dir", str(run_dir), *SYNTHETIC, *extra])

    return launch


def snapshot(run_dir):
    """Every file of the run directory but its lock, with its mtime and content."""
    return {
        path.relative_to(run_dir).as_posix(): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.name != "run.lock"
    }


def test_a_restored_file_with_a_new_mtime_resumes_and_a_changed_one_is_named_changing_nothing(
    tmp_path, killed_before_training
):
    run = tmp_path / "run"
    killed_before_training(run)
    image = run / "synthetic_data" / "JPEGImages" / "val_00000.jpg"
    assert image.is_file(), sorted(p.name for p in image.parent.iterdir())
    content = image.read_bytes()
    image.unlink()
    image.write_bytes(content)  # restored byte for byte, with a new mtime
    os.utime(image, ns=(10**18, 10**18))
    killed_before_training(run)
    saved = json.loads((run / "run_config.json").read_text())
    assert set(saved["data"]["val"]) == {"content_sha256", "num_images"}

    before = snapshot(run)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image, format="JPEG")
    with pytest.raises(ConfigError) as refused:
        killed_before_training(run, "--num_workers", "1")  # a setting a relaunch may change: not recorded either
    message = str(refused.value)
    assert "val" in message and "1 changed (JPEGImages/val_00000.jpg)" in message, message
    assert "labeled (" not in message and "unlabeled (" not in message
    after = snapshot(run)
    after.pop("synthetic_data/JPEGImages/val_00000.jpg"), before.pop("synthetic_data/JPEGImages/val_00000.jpg")
    assert after == before  # no cache built, unlabeled_source.json and run_config.json untouched


def test_a_run_directory_moved_to_another_output_dir_resumes(tmp_path, killed_before_training):
    run, moved = tmp_path / "run", tmp_path / "bigger_disk" / "run"
    killed_before_training(run)
    saved = json.loads((run / "run_config.json").read_text())
    moved.parent.mkdir()
    shutil.copytree(run, moved)  # copied files get new mtimes: they are hashed again
    shutil.rmtree(run)
    killed_before_training(moved)
    assert json.loads((moved / "run_config.json").read_text())["data"] == saved["data"]
    source = json.loads((moved / "unlabeled_source.json").read_text())
    assert source["root"] == str((moved / "synthetic_data").resolve())


def test_split_changes_name_the_files_added_and_removed(tmp_path, killed_before_training):
    run = tmp_path / "run"
    killed_before_training(run)
    split = run / "synthetic_data" / "splits" / "unlabeled.txt"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines[1:]) + "\n")
    removed = lines[0].split()
    with pytest.raises(ConfigError, match=rf"unlabeled .*: 2 removed \({removed[0]}, {removed[1]}\)") as refused:
        killed_before_training(run)
    assert "already holds a run on other data" in str(refused.value)


def earlier_data_record(run):
    """The ``data`` section as the earlier version wrote it: a fingerprint of paths, sizes and mtimes per part."""
    root = (run / "synthetic_data").resolve()
    source = get_source("pascal")
    record = {}
    for part in ("labeled", "unlabeled", "val"):
        split = root / "splits" / f"{part}.txt"
        records = source.records(root, split)
        record[part] = {
            "fingerprint": fingerprint(source, root, read_split_text(split), records, True),
            "num_images": len(records),
        }
    return record


def write_earlier_format(run, data):
    """``data`` as the earlier version's ``data`` section, in ``run_config.json`` and in the copy of the settings
    that version kept in ``state.json`` (ignored now)."""
    record = json.loads((run / "run_config.json").read_text())
    record["data"] = {**data, "id2label": record["data"]["id2label"]}
    (run / "run_config.json").write_text(json.dumps(record))
    (run / "state.json").write_text(json.dumps({"version": 1, "run_config": record, "stages": {}}))


def test_a_run_directory_of_the_earlier_format_resumes_if_its_files_match_else_says_what_to_do(
    tmp_path, killed_before_training
):
    run = tmp_path / "run"
    killed_before_training(run)
    current = json.loads((run / "run_config.json").read_text())["data"]
    (run / "data_files.json").unlink()
    write_earlier_format(run, earlier_data_record(run))
    killed_before_training(run)  # the earlier record matches the files: taken over
    assert json.loads((run / "run_config.json").read_text())["data"] == current

    write_earlier_format(run, earlier_data_record(run))
    os.utime(run / "synthetic_data" / "JPEGImages" / "val_00000.jpg", ns=(10**18, 10**18))
    with pytest.raises(ConfigError, match="earlier version") as refused:
        killed_before_training(run)
    assert 'delete the "data" section' in str(refused.value) and "val images" in str(refused.value)
    config = json.loads((run / "run_config.json").read_text())
    del config["data"]
    (run / "run_config.json").write_text(json.dumps(config))
    killed_before_training(run)  # as the refusal advised
    assert json.loads((run / "run_config.json").read_text())["data"] == current


def resolve(argv, num_processes=1, device_type="cpu"):
    data, model, run, _ = parse_arguments(argv)
    return resolve_run_config(data, model, run, num_processes, device_type)


def test_another_process_count_with_the_same_global_batch_is_accepted_with_a_batchnorm_warning(tmp_path, caplog):
    two_gpus = resolve(["--global_batch_size", "8"], num_processes=2, device_type="cuda").record()
    one_gpu = resolve(["--global_batch_size", "8", "--gradient_accumulation_steps", "2"], device_type="cuda").record()
    assert two_gpus["sync_bn"] and not one_gpu["sync_bn"]
    assert config_differences(two_gpus, one_gpu) == []
    check_and_record_run_config(tmp_path, two_gpus)
    with caplog.at_level("WARNING"):
        check_and_record_run_config(tmp_path, one_gpu)
    assert "BatchNorm batch 8 (SyncBatchNorm)" in caplog.text and "BatchNorm batch 4" in caplog.text
    # another global batch changes the steps and the lr: refused, listing the layout too
    other = resolve(["--global_batch_size", "4"]).record()
    differing = [key for key, _, _ in config_differences(two_gpus, other)]
    assert {"global_batch_size", "scaled_lr", "num_processes"} <= set(differing)


def test_a_replaced_backbone_weights_file_is_refused_naming_the_option_and_file(tmp_path):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"first weights")
    argv = ["--backbone_weights", str(weights)]
    check_and_record_run_config(tmp_path / "run", resolve(argv).record())
    check_and_record_run_config(tmp_path / "run", resolve(argv).record())  # the same content: resumes
    weights.write_bytes(b"other weights")
    with pytest.raises(ConfigError, match="backbone_weights_sha256") as refused:
        check_and_record_run_config(tmp_path / "run", resolve(argv).record())
    assert f"the file {weights} given as --backbone_weights has other content" in str(refused.value)
    # a run directory of an earlier version, which did not record the content, resumes
    earlier = resolve(argv).record()
    earlier.pop("backbone_weights_sha256"), earlier.pop("coco_init_sha256")
    check_and_record_run_config(tmp_path / "earlier", earlier)
    check_and_record_run_config(tmp_path / "earlier", resolve(argv).record())


@pytest.mark.slow
def test_a_two_process_run_resumes_on_one_process_with_the_same_global_batch(tmp_path):
    """A job requeued onto fewer devices: the relaunch is accepted (with the BatchNorm warning), the finished stage
    is kept, and the data check (hashed by the main process, shared with the others) works on 2 processes."""
    run = tmp_path / "run"
    assert_ok(run_script(run, "--framework", "suponly", "--epochs", "1", processes=2))
    config = json.loads((run / "run_config.json").read_text())
    assert config["num_processes"] == 2 and config["per_device_batch_size"] == 2
    resumed = run_script(run, "--framework", "suponly", "--epochs", "1", "--gradient_accumulation_steps", "2")
    assert_ok(resumed)
    assert "[suponly] already finished: skipped" in resumed.stdout
    assert "2 per device x 2 processes x 1 accumulation steps, BatchNorm batch 2" in resumed.stderr
    assert "2 per device x 1 processes x 2 accumulation steps, BatchNorm batch 2" in resumed.stderr
    assert json.loads((run / "run_config.json").read_text())["num_processes"] == 1


def earlier_names(record):
    """``record`` as an earlier version wrote it: ``lr`` the lr used, ``base_lr`` the --lr option, ``dataset`` the
    kind of data ("synthetic" where today's is None: no layout)."""
    renamed = {"lr": "base_lr", "scaled_lr": "lr"}
    earlier = {renamed.get(key, key): value for key, value in record.items()}
    return {**earlier, "dataset": "synthetic" if record["dataset"] is None else record["dataset"]}


def test_a_run_directory_with_the_earlier_names_resumes_and_is_recorded_in_todays(tmp_path, killed_before_training):
    run = tmp_path / "run"
    killed_before_training(run, "--global_batch_size", "2")
    config = json.loads((run / "run_config.json").read_text())
    assert (config["lr"], config["scaled_lr"]) == (0.02, 0.02 / 16 * 2) and "base_lr" not in config
    assert config["dataset"] is None  # synthetic data: no --dataset layout
    (run / "run_config.json").write_text(json.dumps(earlier_names(config)))
    killed_before_training(run, "--global_batch_size", "2")  # accepted: the same settings in earlier names
    assert json.loads((run / "run_config.json").read_text()) == config  # rewritten in today's names
    # an earlier record with other settings is still refused, named in today's names
    (run / "run_config.json").write_text(json.dumps({**earlier_names(config), "base_lr": 0.04}))
    with pytest.raises(ConfigError, match="lr: 0.04 -> 0.02"):
        killed_before_training(run, "--global_batch_size", "2")


def test_the_settings_are_kept_and_compared_in_run_config_json_alone(tmp_path, killed_before_training):
    """state.json holds no copy of the settings; the copy an earlier version kept there is neither compared nor
    kept: run_config.json alone decides whether a relaunch is the same run."""
    run = tmp_path / "run"
    killed_before_training(run, "--global_batch_size", "2")
    config = json.loads((run / "run_config.json").read_text())
    state = {"version": STATE_VERSION, "run_config": {**config, "epochs": 99}, "stages": {}}
    (run / "state.json").write_text(json.dumps(state))
    RunState(run).save()  # the earlier copy, even one that differs, is not compared: dropped when written
    assert json.loads((run / "state.json").read_text()) == {"version": STATE_VERSION, "stages": {}}
    killed_before_training(run, "--global_batch_size", "2")
    with pytest.raises(ConfigError, match="global_batch_size: 2 -> 4"):
        killed_before_training(run, "--global_batch_size", "4")


def test_a_launch_claims_its_run_directory_once(tmp_path, monkeypatch):
    """The shared-directory check and the lock run once per launch: the pipeline does not repeat the command's."""
    from stpp_hf.training import pipeline, run_directory

    claims = []
    monkeypatch.setattr(run_directory, "check_shared_run_dir", lambda accelerator, run_dir: claims.append(run_dir))
    monkeypatch.setattr(pipeline, "claim_run_directory", lambda accelerator, run_dir: claims.append(run_dir))

    def stop(self):
        raise Killed()

    monkeypatch.setattr(pipeline._Run, "run", stop)  # after the pipeline has set up (and would have claimed)
    with pytest.raises(Killed):
        cli.main(["--output_dir", str(tmp_path / "run"), *SYNTHETIC])
    assert len(claims) == 1
