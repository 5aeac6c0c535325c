"""Relaunching a run in its directory: a redone stage redoes the stages after it, damaged files are
reported or repaired stage by stage, and two launches never share a directory."""

import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from helpers import tiny_deeplab

from stpp_hf import DeepLabImageProcessor, DeepLabV3PlusForSemanticSegmentation
from stpp_hf.data import load_source, make_synthetic_dataset, read_split
from stpp_hf.data.run_sources import RunSources
from stpp_hf.training.config import resolve_options
from stpp_hf.training.pipeline import RunSettings, run_pipeline
from stpp_hf.training.results import RunResults
from stpp_hf.training.run_directory import lock_run
from stpp_hf.training.run_layout import RunLayout
from stpp_hf.training.stages import build_stages, snapshot_epochs
from stpp_hf.training.state import RunDirectoryLocked, lock_run_directory

STAGES = ["suponly", "select", "label_reliable", "retrain_reliable", "label_unreliable", "retrain_all"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the end-to-end scripts run (OMP_NUM_THREADS=1): tiny convolutions on shared
    cores are several times slower with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic = make_synthetic_dataset(
        root / "synthetic", seed=0, num_labeled=4, num_unlabeled=4, num_val=2, image_size=32
    )
    files = synthetic.split_files
    sources = {
        part: load_source(
            "pascal", synthetic.root, files[part], require_masks=part != "unlabeled", cache_dir=root / "cache"
        )
        for part in ("labeled", "unlabeled", "val")
    }
    return RunSources(
        labeled=sources["labeled"], unlabeled=sources["unlabeled"], val=sources["val"], id2label=synthetic.id2label,
        palette=synthetic.palette, unlabeled_split=read_split(files["unlabeled"]), unlabeled_have_masks=True,
    )  # fmt: skip


class Factory:
    """A tiny DeepLabV3+; ``init_seed`` replaces the stage's seed for the fresh weights, as a retraining on
    other hardware gives other weights."""

    def __init__(self, num_labels, init_seed=None):
        self.num_labels, self.init_seed = num_labels, init_seed

    def __call__(self):
        if self.init_seed is not None:
            torch.manual_seed(self.init_seed)
        return tiny_deeplab(num_labels=self.num_labels)


def settings_for(run_dir, factory, **overrides):
    config = resolve_options(
        output_dir=str(run_dir), framework="stpp", epochs=3, global_batch_size=4, lr=0.02, val_batch_size=2,
        channels_last=False, inference_batch_size=4, crop_size=32, base_size=32, **overrides,
    )  # fmt: skip
    return RunSettings(
        config=config, model_factory=factory, model_class=DeepLabV3PlusForSemanticSegmentation,
        image_processor=DeepLabImageProcessor(),
    )  # fmt: skip


def skipped_stages(output: str) -> list[str]:
    return [stage for stage in STAGES if f"[{stage}] already finished: skipped" in output]


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """A finished tiny ST++ run (copied by each test that changes it)."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    results = run_pipeline(Accelerator(cpu=True), data, settings_for(run_dir, Factory(len(data.id2label))))
    return run_dir, results


def copy_run(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    (run_dir / "run.lock").unlink()
    return run_dir


@pytest.mark.slow
def test_the_run_directory_holds_what_run_layout_names_and_results_json_its_results(finished_run):
    run_dir, results = finished_run
    layout = RunLayout(run_dir)
    expected = {layout.results, layout.state, layout.lock, layout.final, *layout.figures().values()}
    expected |= {layout.label_next_csv, layout.label_next_figure}  # ST++: the images to annotate next
    for index, stage in enumerate(build_stages("stpp")):
        files = layout.stage(index, stage)
        if stage.kind == "train":
            expected |= {files.best, files.val_predictions}
            expected |= {files.snapshot(epoch) for epoch in snapshot_epochs(3)} if stage.keep_snapshots else set()
            assert results.stages[index].model_dir == layout.relative(files.best)
        elif stage.kind == "select":
            expected |= set(files.selection_files)
            assert results.stages[index].figure == layout.relative(files.selection_figure)
        else:
            expected.add(run_dir / results.stages[index].store_dir)
            assert (run_dir / results.stages[index].store_dir).parent == layout.pseudo_labels
    assert sorted(path for path in expected if not path.exists()) == []
    written = [path for path in run_dir.rglob("*") if path.is_file()]
    assert [path for path in written if not any(path == e or e in path.parents for e in expected)] == []
    assert results.final.model_dir == layout.relative(layout.final)
    assert layout.results.read_text() == json.dumps(results.to_json(), indent=2) + "\n"
    assert RunResults.read(run_dir).to_json() == results.to_json()


@pytest.mark.slow
def test_a_redone_suponly_redoes_every_later_stage(data, finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    old_state = json.loads((run_dir / "state.json").read_text())
    shutil.rmtree(run_dir / "stages" / "1-suponly" / "best")
    factory = Factory(len(data.id2label), init_seed=1234)  # the retrained SupOnly has other weights
    capsys.readouterr()
    run_pipeline(Accelerator(cpu=True), data, settings_for(run_dir, factory))
    skipped = skipped_stages(capsys.readouterr().out)
    assert "select" not in skipped and "label_reliable" not in skipped
    new_state = json.loads((run_dir / "state.json").read_text())
    old_stages, new_stages = old_state["stages"], new_state["stages"]
    assert new_stages["select"]["inputs"]["teacher"] != old_stages["select"]["inputs"]["teacher"]
    assert new_stages["label_reliable"]["summary"]["store_dir"] != old_stages["label_reliable"]["summary"]["store_dir"]
    # a stage is redone exactly when what it reads changed (a re-training: when its pseudo labels changed)
    assert [stage for stage in STAGES if new_stages[stage]["inputs"] == old_stages[stage]["inputs"]] == [
        "suponly",
        *skipped,
    ]
    assert skipped in ([], ["retrain_reliable", "label_unreliable", "retrain_all"])
    # a relaunch now redoes nothing
    capsys.readouterr()
    run_pipeline(Accelerator(cpu=True), data, settings_for(run_dir, factory))
    assert skipped_stages(capsys.readouterr().out) == STAGES


@pytest.mark.slow
def test_a_stage_finished_before_its_upstream_was_redone_is_redone(data, finished_run, tmp_path, capsys):
    # as after a kill between redoing SupOnly and redoing selection: SupOnly's record is new, selection's old
    run_dir = copy_run(finished_run, tmp_path)
    state = json.loads((run_dir / "state.json").read_text())
    select_inputs = state["stages"]["select"]["inputs"]
    assert set(select_inputs) == {"snapshot_epoch_1", "snapshot_epoch_2", "snapshot_epoch_3", "teacher"}
    select_inputs["teacher"] = "0" * 64
    (run_dir / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    run_pipeline(Accelerator(cpu=True), data, settings_for(run_dir, Factory(len(data.id2label))))
    # same weights from the same seed: selection is redone, its outputs are the same, so the rest stands
    assert skipped_stages(capsys.readouterr().out) == [stage for stage in STAGES if stage != "select"]


@pytest.mark.slow
def test_redo_stage_redoes_that_stage_and_those_after_it_even_with_a_damaged_record(
    data, finished_run, tmp_path, capsys
):
    run_dir = copy_run(finished_run, tmp_path)
    state = json.loads((run_dir / "state.json").read_text())
    state["stages"]["label_unreliable"] = ["not", "a", "record"]
    (run_dir / "state.json").write_text(json.dumps(state))
    with pytest.raises(
        ValueError, match="record of stage 'label_unreliable' is malformed.*--redo_stage label_unreliable"
    ):
        run_pipeline(Accelerator(cpu=True), data, settings_for(run_dir, Factory(len(data.id2label))))
    capsys.readouterr()
    run_pipeline(
        Accelerator(cpu=True), data, settings_for(run_dir, Factory(len(data.id2label)), redo_stage="label_unreliable")
    )
    assert skipped_stages(capsys.readouterr().out) == STAGES[:4]
    with pytest.raises(ValueError, match="redo_stage must be one of"):
        run_pipeline(Accelerator(cpu=True), data, settings_for(run_dir, Factory(len(data.id2label)), redo_stage="sup"))


@pytest.mark.slow
def test_torn_pseudo_label_manifest_and_header_are_rebuilt_and_nothing_else_is_redone(
    data, finished_run, tmp_path, capsys
):
    run_dir = copy_run(finished_run, tmp_path)
    state = json.loads((run_dir / "state.json").read_text())
    store = run_dir / state["stages"]["label_reliable"]["summary"]["store_dir"]
    manifest = (store / "manifest.json").read_bytes()
    (store / "manifest.json").write_bytes(manifest[: len(manifest) // 2])
    (store / "store.json").write_text("garbage")
    capsys.readouterr()
    run_pipeline(Accelerator(cpu=True), data, settings_for(run_dir, Factory(len(data.id2label))))
    # the label stage is checked again and its manifest rebuilt from the journals; the labels are the same
    assert skipped_stages(capsys.readouterr().out) == [stage for stage in STAGES if stage != "label_reliable"]
    assert (store / "manifest.json").read_bytes() == manifest
    assert (
        json.loads((store / "store.json").read_text())["fingerprint"]
        == state["stages"]["label_reliable"]["inputs"]["teacher"]
    )


@pytest.mark.parametrize("damage", ["garbage", "incomplete", "truncated_weights"])
def test_a_damaged_epoch_checkpoint_names_the_file_and_how_to_restart_the_stage(data, tmp_path, damage):
    # a checkpoint as a kill after SupOnly's second epoch leaves it, then damaged
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "stages" / "1-suponly" / "checkpoint"
    settings = settings_for(run_dir, Factory(len(data.id2label)))
    trainer_state = {"epoch": 2, "best_miou": 0.1, "best_epoch": 1, "history": [], "best_metrics": {}, "inputs": {}}
    saver = Accelerator(cpu=True)
    model = Factory(len(data.id2label))()
    saver.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    saver.save_state(str(checkpoint), safe_serialization=True)
    if damage == "garbage":
        (checkpoint / "trainer_state.json").write_text("\x00\x01{")
        expected = "trainer_state.json is not valid JSON"
    elif damage == "incomplete":
        (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": 2}))
        expected = r"trainer_state.json: trainer_state lacks the field\(s\) \['best_miou', 'best_epoch'"
    else:
        (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = "cannot load the epoch checkpoint"
    with pytest.raises(ValueError, match=f"{expected}.*delete .*checkpoint to restart stage 1-suponly") as error:
        run_pipeline(Accelerator(cpu=True), data, settings)
    assert str(checkpoint) in str(error.value)


@pytest.mark.slow
def test_a_second_launch_on_a_locked_run_directory_is_refused_naming_the_holder(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stpp_hf.training.state import lock_run_directory; "
         "lock_run_directory(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RunDirectoryLocked, match=f"in use by another launch \\(pid {holder.pid} on host .*, started "
        ):
            lock_run(Accelerator(cpu=True), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_run_directory(tmp_path)  # the kernel released the lock of the killed process
    lock_run_directory(tmp_path)  # this process already holds it
    assert f"pid {__import__('os').getpid()} " in (tmp_path / "run.lock").read_text()
