"""SIGKILL inside a training stage and inside a pseudo-labeling stage, relaunch, same artefacts."""

import json
import subprocess
import sys

import pytest
from helpers import LONG_LABELING_STPP_ARGS, REPO, SCRIPT, TINY_ARGS, assert_ok, run_script, script_env, wait_for
from safetensors.torch import load_file


def finished_stages(run_dir):
    state = run_dir / "state.json"
    return set(json.loads(state.read_text())["stages"]) if state.is_file() else set()


def launch(run_dir):
    command = [sys.executable, str(SCRIPT), "--output_dir", str(run_dir), *TINY_ARGS, *LONG_LABELING_STPP_ARGS]
    return subprocess.Popen(
        command, env=script_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def kill_when(process, condition, timeout=240):
    """SIGKILL ``process`` as soon as ``condition()`` holds; fails if it ends first."""
    wait_for(process, condition, timeout, point="the kill point")
    process.kill()
    process.wait()


def labeling_in_progress(run_dir):
    done = finished_stages(run_dir)
    for stage in ("label_reliable", "label_unreliable"):
        stores = list((run_dir / "pseudo_labels").glob(f"{stage}-*/labels/*.png"))
        if stores and stage not in done:
            return True
    return False


@pytest.mark.slow
def test_sigkill_in_training_and_labeling_then_relaunch_matches_uninterrupted(tmp_path, stpp_run):
    (reference, completed), killed = stpp_run, tmp_path / "killed"  # the uninterrupted run, same options
    assert_ok(completed)

    # 1) inside SupOnly training, after its first epoch checkpoint
    process = launch(killed)
    kill_when(process, lambda: (killed / "stages" / "1-suponly" / "checkpoint" / "trainer_state.json").is_file())
    assert "suponly" not in finished_stages(killed)
    # 2) relaunch; kill again while a pseudo-label store is half written
    process = launch(killed)
    kill_when(process, lambda: labeling_in_progress(killed))
    # 3) relaunch to the end
    completed = run_script(killed, *LONG_LABELING_STPP_ARGS)
    assert_ok(completed)
    assert "already finished: skipped" in completed.stdout

    for name in ("reliable_ids.txt", "unreliable_ids.txt"):
        assert (killed / "stages" / "2-select" / name).read_text() == (
            reference / "stages" / "2-select" / name
        ).read_text()
    reference_results = json.loads((reference / "results.json").read_text())
    killed_results = json.loads((killed / "results.json").read_text())
    for stage in ("label_reliable", "label_unreliable"):
        stores = [sorted((run / "pseudo_labels").glob(f"{stage}-*")) for run in (reference, killed)]
        assert len(stores[0]) == len(stores[1]) == 1  # same teacher fingerprint: same store name
        labels = [sorted(p.name for p in (store[0] / "labels").iterdir()) for store in stores]
        assert labels[0] == labels[1] and len(labels[0]) == 8
        for name in labels[0]:
            assert (stores[0][0] / "labels" / name).read_bytes() == (stores[1][0] / "labels" / name).read_bytes()
    final = [load_file(run / "final" / "model.safetensors") for run in (reference, killed)]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        assert (final[0][key] - final[1][key]).abs().max() <= 1e-5, key
    assert killed_results["final"]["val_miou"] == pytest.approx(reference_results["final"]["val_miou"], abs=1e-6)
