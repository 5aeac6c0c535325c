"""Preemption with real signals on launched runs: SIGTERM mid-epoch (to one process of two as well) saves a step
checkpoint and exits with PREEMPTED_EXIT_CODE, a signal during labeling exits the same way, the relaunch ends
identical to an uninterrupted run; killing the launcher ends its workers."""

import json
import signal
import stat
import subprocess

import psutil
import pytest
from helpers import REPO, assert_ok, run_script, script_command, wait_for
from safetensors.torch import load_file

from stpp_hf.file_io import current_umask
from stpp_hf.training.preemption import PREEMPTED_EXIT_CODE

# more unlabeled images, labeled one at a time, so the labeling stage lasts long enough to be hit
ARGS = ["--epochs", "2", "--synthetic_num_unlabeled", "16", "--inference_batch_size", "1"]


def launch(run_dir, *extra, processes=1):
    command, env = script_command(run_dir, *ARGS, *extra, processes=processes)
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trainer_state(run_dir):
    path = run_dir / "stages" / "1-suponly" / "checkpoint" / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def in_second_epoch(run_dir):
    """A step checkpoint (``--save_steps 1``) after the first step of SupOnly's second epoch is on disk."""
    state = trainer_state(run_dir)
    return state.get("epoch") == 1 and state.get("epoch_in_progress", {}).get("epoch_step") == 1


def workers(launcher):
    """The launcher's training processes; a child that has just exited (a zombie or gone) is none of them."""
    found = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "train_stpp.py" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def assert_same_final_model(reference, resumed):
    final = [load_file(run / "final" / "model.safetensors") for run in (reference, resumed)]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        assert final[0][key].equal(final[1][key]), key
    histories = [[stage.get("history") for stage in json.loads((run / "results.json").read_text())["stages"]]
                 for run in (reference, resumed)]  # fmt: skip
    assert histories[0] == histories[1]


def stop_lines(output):
    """The lines the run printed about its stop (a progress bar may precede one on its line)."""
    return [
        "stpp-train: " + line.split("stpp-train: ", 1)[1] for line in output.splitlines() if "stpp-train: " in line
    ]


def assert_stopped_mid_epoch(completed_output, run_dir):
    lines = stop_lines(completed_output)
    assert len(lines) == 1 and "[1-suponly] stopped by SIGTERM after epoch 2 step " in lines[0], lines
    assert f"relaunch the same command to resume (exit code {PREEMPTED_EXIT_CODE})" in lines[0]
    progress = trainer_state(run_dir)["epoch_in_progress"]
    assert progress["epoch_step"] >= 2


@pytest.mark.slow
def test_sigterm_mid_epoch_and_in_labeling_exit_with_the_requeue_code_and_resume_to_the_same_run(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    # 1) SIGTERM inside SupOnly's second epoch: a step checkpoint, one line, the requeue exit code
    process = launch(stopped, "--framework", "st", "--save_steps", "1")
    wait_for(process, lambda: in_second_epoch(stopped), timeout=600)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    assert_stopped_mid_epoch(output, stopped)
    assert "Traceback" not in output
    # 2) relaunch (no --save_steps: it does not change results); SIGTERM while the pseudo labels are written
    process = launch(stopped, "--framework", "st")
    wait_for(process, lambda: any((stopped / "pseudo_labels").glob("label_all-*/labels/*.png")), timeout=600)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    assert "resuming epoch 2 after step" in output
    assert stop_lines(output) == [
        f"stpp-train: stopped by SIGTERM; relaunch the same command to resume (exit code {PREEMPTED_EXIT_CODE})"
    ]
    state = json.loads((stopped / "state.json").read_text())
    assert set(state["stages"]) == {"suponly"}
    # 3) relaunch to the end: identical to the uninterrupted run
    completed = run_script(stopped, *ARGS, "--framework", "st", timeout=900)
    assert_ok(completed)
    assert "[suponly] already finished: skipped" in completed.stdout
    assert_ok(run_script(reference, *ARGS, "--framework", "st", timeout=900))
    assert_same_final_model(reference, stopped)
    for path in (stopped / "results.json", stopped / "state.json", stopped / "final" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask(), path


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_and_resumes_to_the_same_run(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    process = launch(stopped, "--framework", "suponly", "--save_steps", "1", processes=2)
    wait_for(process, lambda: in_second_epoch(stopped), timeout=600)
    (rank_1,) = [worker for worker in workers(process) if worker.environ().get("RANK") == "1"]
    rank_1.send_signal(signal.SIGTERM)  # rank 0 learns of it through the all-reduce at the next step boundary
    output = process.communicate(timeout=300)[0]
    # the launcher reports its workers' codes (once the first exits it sends SIGTERM to the others, which may
    # still be ending); that both took part in the step checkpoint is checked below
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in output, output[-3000:]
    assert_stopped_mid_epoch(output, stopped)
    assert len(trainer_state(stopped)["epoch_in_progress"]["loss_sums"]) == 2

    assert_ok(run_script(stopped, *ARGS, "--framework", "suponly", processes=2, timeout=900))
    assert_ok(run_script(reference, *ARGS, "--framework", "suponly", processes=2, timeout=900))
    assert_same_final_model(reference, stopped)


@pytest.mark.slow
def test_killing_the_launcher_ends_its_workers(tmp_path):
    run_dir = tmp_path / "run"
    process = launch(run_dir, "--framework", "suponly", "--epochs", "40", processes=2)
    try:
        wait_for(
            process, lambda: len(workers(process)) == 2 and (run_dir / "stages" / "1-suponly").is_dir(), timeout=600
        )
        launched = workers(process)
        process.kill()  # SIGKILL: the launcher cannot forward anything
        process.wait()
        gone, alive = psutil.wait_procs(launched, timeout=90)
        assert alive == [], f"workers {[worker.pid for worker in alive]} outlived their launcher"
    finally:
        for worker in psutil.Process().children(recursive=True):
            worker.kill()
