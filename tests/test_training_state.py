import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from stpp_hf.file_io import (
    _old_name,
    atomic_write_json,
    recover_directory,
    replace_directory,
    temporary_directory_for,
)
from stpp_hf.training import state as state_module
from stpp_hf.training.recipe import poly_factor, scaled_lr
from stpp_hf.training.stages import build_stages, snapshot_epochs, stage_dir_name
from stpp_hf.training.state import RunState, TrainerState


def test_stage_sequences_follow_the_spec():
    assert [s.name for s in build_stages("suponly")] == ["suponly"]
    st = build_stages("st")
    assert [(s.kind, s.source, s.subset) for s in st] == [
        ("train", None, "all"),
        ("label", "suponly", "all"),
        ("train", None, "all"),
    ]
    assert st[2].pseudo_label_stages == ("label_all",)
    stpp = build_stages("stpp")
    assert [s.kind for s in stpp] == ["train", "select", "label", "train", "label", "train"]
    assert stpp[0].keep_snapshots and not st[0].keep_snapshots
    assert (stpp[2].source, stpp[2].subset) == ("suponly", "reliable")
    assert (stpp[4].source, stpp[4].subset) == ("retrain_reliable", "unreliable")
    assert stpp[5].pseudo_label_stages == ("label_reliable", "label_unreliable")
    assert stage_dir_name(0, stpp[0]) == "1-suponly"
    with pytest.raises(ValueError, match="framework"):
        build_stages("fixmatch")


def test_snapshot_epochs_and_lr_recipe():
    assert snapshot_epochs(80) == (26, 53, 80)
    assert snapshot_epochs(9) == (3, 6, 9)
    with pytest.raises(ValueError):
        snapshot_epochs(2)
    # global batch 16 (e.g. 2 processes x 4 images x 2 accumulation steps) keeps the base lr
    assert scaled_lr(0.001, 16) == pytest.approx(0.001)
    assert scaled_lr(0.004, 8) == pytest.approx(0.002)
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(50, 100) == pytest.approx(0.5**0.9)


def test_run_state_records_checksums_and_detects_changes(tmp_path):
    (tmp_path / "stages" / "best").mkdir(parents=True)
    (tmp_path / "stages" / "best" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "ids.txt").write_text("a\n")
    state = RunState(tmp_path)
    assert not state.is_done("suponly")
    state.mark_done("suponly", ["stages/best", "ids.txt"], {"val_miou": 0.5})
    reloaded = RunState(tmp_path)
    assert reloaded.is_done("suponly") and reloaded.summary("suponly") == {"val_miou": 0.5}
    (tmp_path / "ids.txt").write_text("b\n")
    assert not reloaded.is_done("suponly")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        state.mark_done("x", ["missing.txt"], {})


def test_a_state_file_of_an_earlier_version_loads_and_is_written_back_without_its_settings_copy(tmp_path):
    # as an earlier version wrote it (atomic_write_json of plain dicts, a copy of the run's settings in it), and the
    # oldest record without "inputs"
    (tmp_path / "ids.txt").write_text("a\n")
    checksum = "87428fc522803d31065e7bce3cf03fe475096631e5e07bbd7a0fde60c4cf25c7"  # sha256 of "a\n"
    stages = {
        "suponly": {"artefacts": {"ids.txt": checksum}, "inputs": {"ids": "1" * 64}, "summary": {"val_miou": 0.5}},
        "select": {"artefacts": {"ids.txt": checksum}, "summary": {"num_reliable": 1}},
    }
    old = {"version": 1, "run_config": {"framework": "stpp", "epochs": 3}, "stages": stages}
    atomic_write_json(tmp_path / "state.json", old)
    state = RunState(tmp_path)
    assert state.is_done("suponly", {"ids": "1" * 64}) and state.is_done("select", {})
    assert state.summary("select") == {"num_reliable": 1}
    state.save()  # the same file without the settings (run_config.json's), the oldest record with its empty inputs
    stages["select"] = {"artefacts": {"ids.txt": checksum}, "inputs": {}, "summary": {"num_reliable": 1}}
    atomic_write_json(tmp_path / "expected.json", {"version": 1, "stages": stages})
    assert (tmp_path / "state.json").read_bytes() == (tmp_path / "expected.json").read_bytes()


@pytest.mark.parametrize("in_progress", [False, True])
def test_a_trainer_state_of_the_previous_version_reads_back_and_is_written_the_same(tmp_path, in_progress):
    # the dict the previous version's trainer wrote with atomic_write_json (a step checkpoint: epoch_in_progress)
    old = {"epoch": 2, "best_miou": 0.25, "best_epoch": 1, "history": [{"epoch": 1, "loss": 1.5, "val_miou": 0.25}],
           "best_metrics": {"miou": 0.25, "per_class_iou": {"background": 0.5, "disc": None}},
           "inputs": {"ids": "1"}}  # fmt: skip
    if in_progress:
        old["epoch_in_progress"] = {"epoch_step": 3, "interval_steps": 1, "loss_sums": [0.5, 1], "epoch_loss_sum": 2}
    atomic_write_json(tmp_path / "old.json", old)
    saved = TrainerState.read(tmp_path / "old.json")
    assert saved.best_miou == 0.25 and saved.history == old["history"]
    assert (saved.epoch_in_progress.loss_sums == [0.5, 1]) if in_progress else saved.epoch_in_progress is None
    saved.write(tmp_path / "new.json")
    assert (tmp_path / "new.json").read_bytes() == (tmp_path / "old.json").read_bytes()
    del old["inputs"]  # the oldest checkpoints: no inputs recorded
    assert TrainerState.from_json(old).inputs == {}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data.update(epoch=2.0), r"field trainer_state.epoch must be an integer, got 2.0"),
        (lambda data: data.update(best_miou=None), r"field trainer_state.best_miou must be a number, got None"),
        (lambda data: data.update(epoch_in_progress={"epoch_step": 1}), r"epoch_in_progress lacks the field\(s\)"),
        (lambda data: data.update(step=4), r"trainer_state has the unknown field 'step'"),
    ],
)
def test_a_damaged_trainer_state_names_the_file_the_field_and_what_to_do(tmp_path, damage, message):
    data = {"epoch": 2, "best_miou": 0.25, "best_epoch": 1, "history": [], "best_metrics": {}, "inputs": {}}
    damage(data)
    atomic_write_json(tmp_path / "trainer_state.json", data)
    with pytest.raises(ValueError, match=f"{message}.*; delete it") as error:
        TrainerState.read(tmp_path / "trainer_state.json", "delete it")
    assert str(tmp_path / "trainer_state.json") in str(error.value)


def test_corrupt_state_file_is_reported(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json"):
        RunState(tmp_path)


def test_directory_replacement_survives_an_interrupted_swap(tmp_path):
    target = tmp_path / "best"
    first = temporary_directory_for(target)
    (first / "w").write_text("1")
    replace_directory(first, target)
    second = temporary_directory_for(target)
    (second / "w").write_text("2")
    # simulate a kill between the two renames of replace_directory
    target.rename(_old_name(target))
    assert not target.exists()
    recover_directory(target)
    assert (target / "w").read_text() == "1"
    replace_directory(second, target)
    assert (target / "w").read_text() == "2" and not _old_name(target).exists()
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "state must be an object, got list"),
        ('{"version": 1, "stages": []}', r"field state.stages must be an object, got \[\]"),
        ('{"stages": {}}', r"state lacks the field\(s\) \['version'\]"),
        ('{"version": 1, "stages": {}, "step": 3}', r"state has the unknown field 'step'"),
        (
            '{"version": 1, "stages": {"select": {"artefacts": {"a": 1}, "summary": {}}}}',
            r"stages\['select'\].artefacts must be an object of \{path: SHA-256 string\}.*record of stage 'select'",
        ),
    ],
)
def test_a_state_file_of_the_wrong_shape_is_named_with_what_to_do(tmp_path, content, message):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        RunState(tmp_path)
    assert str(tmp_path / "state.json") in str(error.value) and ("move it away" in str(error.value))


def test_changed_inputs_redo_a_stage_and_redo_drops_records_once(tmp_path):
    (tmp_path / "ids.txt").write_text("a\n")
    state = RunState(tmp_path)
    state.mark_done("select", ["ids.txt"], {}, inputs={"teacher": "1" * 64})
    state.mark_done("label", ["ids.txt"], {}, inputs={"teacher": "2" * 64})
    assert state.is_done("select", {"teacher": "1" * 64}) and not state.is_done("select", {"teacher": "3" * 64})
    redone = RunState(tmp_path, redo=["label"])
    assert redone.is_done("select", {"teacher": "1" * 64}) and not redone.is_done("label", {"teacher": "2" * 64})
    redone.mark_done("label", ["ids.txt"], {}, inputs={"teacher": "4" * 64})
    redone.reload()
    assert redone.is_done("label", {"teacher": "4" * 64})


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (Lustre without ``-o flock``, NFS with ``nolock``): flock raises ENOLCK."""

    def flock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(state_module.fcntl, "flock", flock)
    yield
    state_module._held_locks.clear()


def test_without_flock_the_lock_is_an_exclusively_created_file(tmp_path, no_flock):
    run_dir = tmp_path / "run"
    state_module.lock_run_directory(run_dir)  # raised OSError: [Errno 37] No locks available
    lock_file = run_dir / "run.lock.held"
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in lock_file.read_text()
    state_module.lock_run_directory(run_dir)  # this process holds it already
    del state_module._held_locks[run_dir.resolve()]  # as another process sees it
    with pytest.raises(state_module.RunDirectoryLocked) as refused:
        state_module.lock_run_directory(run_dir)
    message = str(refused.value)
    assert f"pid {os.getpid()} on host" in message and str(lock_file) in message and "No locks available" in message
    assert "no longer runs on this host" not in message  # this process is alive
    state_module._remove_lock_file(lock_file, lock_file.read_bytes())  # what exiting does
    assert not lock_file.exists()


def test_a_lock_file_left_by_a_killed_launch_is_named_stale(tmp_path, no_flock):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock.held").write_text(f"pid {dead_pid} on host {socket.gethostname()}, started yesterday\n")
    with pytest.raises(state_module.RunDirectoryLocked, match=f"pid {dead_pid} no longer runs on this host") as error:
        state_module.lock_run_directory(run_dir)
    assert f"delete {run_dir.resolve() / 'run.lock.held'} and relaunch" in str(error.value)
