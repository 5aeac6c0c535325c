"""Several processes: the collective timeout is the configured one, a process working alone for a while ends
nothing, and a process that stops answering (SIGSTOP) ends every process within the stated time, named."""

import os
import signal
import subprocess
import time

import pytest
from helpers import REPO, TINY_ARGS, launch_command

from stpp_hf.data import load_source, make_synthetic_dataset
from stpp_hf.training.config import resolve_run_config
from stpp_hf.training.errors import ConfigError
from stpp_hf.training.options import parse_arguments
from stpp_hf.training.run_data import cache_build_processes


@pytest.mark.parametrize("option", ["--collective_timeout_s", "--heartbeat_timeout_s"])
@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_timeouts_must_be_positive_seconds(option, value):
    # inf and nan are caught by the check every float option gets (finite), 0 and -1 by the timeouts' own
    with pytest.raises(ConfigError, match=f"{option} must be a (positive number of seconds|finite number)"):
        resolve_run_config(*parse_arguments([option, value])[:3])


# The example's main with the main process working alone for ``sys.argv[1]`` seconds where the dataset caches
# are built (the others wait in a barrier), then every process leaving right after that barrier.
ALONE_SCRIPT = """
import os, sys, time
from stpp_hf.training import cli

def load_run_data(accelerator, *args):
    if accelerator.is_main_process:
        time.sleep(float(sys.argv[1]))
        print("the main process has done its work", flush=True)
    accelerator.wait_for_everyone()
    print(f"process {accelerator.process_index} passed the barrier", flush=True)
    os._exit(0)

cli.load_run_data = load_run_data
cli.main(sys.argv[2:])
"""


def run_alone(tmp_path, alone_s, *options):
    script = tmp_path / "alone.py"
    script.write_text(ALONE_SCRIPT)
    launch, env = launch_command(script, processes=2)
    command = [*launch, str(alone_s), "--output_dir", str(tmp_path / "run"), *TINY_ARGS, *options]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_collective_timeout_is_the_configured_one_and_working_alone_beats(tmp_path):
    # 8 s alone with a 2 s heartbeat timeout: the waiting process still hears the main one beat
    passed = run_alone(tmp_path, 8, "--collective_timeout_s", "60", "--heartbeat_timeout_s", "2")
    assert passed.returncode == 0, passed.stderr[-3000:]
    assert "process 1 passed the barrier" in passed.stdout
    # with a 10 s collective timeout the waiting process gives up long before the main process is done (the
    # default would wait an hour; run_alone's 300 s would fail the test)
    timed_out = run_alone(tmp_path, 1000, "--collective_timeout_s", "10")
    assert timed_out.returncode != 0 and "the main process has done its work" not in timed_out.stdout
    assert "timed out" in (timed_out.stdout + timed_out.stderr).lower()


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def local_rank(pid):
    with open(f"/proc/{pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    return int(variables.get(b"LOCAL_RANK", b"-1"))


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_stopped_process_ends_every_process_within_the_stated_time_naming_it(tmp_path):
    heartbeat_timeout, launcher_grace = 5, 30
    launch, env = launch_command(REPO / "examples" / "train_stpp.py", processes=2)
    run_dir = tmp_path / "run"
    command = [*launch, "--output_dir", str(run_dir), *TINY_ARGS, "--heartbeat_timeout_s", str(heartbeat_timeout)]
    launcher = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "stages" / "1-suponly").is_dir():  # training has started
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = {local_rank(pid): pid for pid in child_pids(launcher.pid)}
        assert set(workers) == {0, 1}
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        bound = heartbeat_timeout + launcher_grace + 25  # + start-up of the check and a loaded machine
        _, stderr = launcher.communicate(timeout=bound + 60)
        elapsed = time.monotonic() - stopped
    finally:
        if launcher.poll() is None:
            for pid in child_pids(launcher.pid):
                os.kill(pid, signal.SIGKILL)
            launcher.kill()
    assert launcher.returncode != 0
    assert elapsed < bound, f"ended after {elapsed:.0f} s"
    assert f"process 1 of 2 (host {os.uname().nodename}, pid {workers[1]}) has not answered" in stderr
    assert not any(alive(pid) for pid in workers.values())


def test_large_dataset_caches_are_built_by_several_processes_into_the_same_table(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cache_build_processes(10582) == 16  # Pascal's augmented train set: every core
    assert cache_build_processes(1000) == 2
    assert cache_build_processes(999) is None and cache_build_processes(20) is None
    synthetic = make_synthetic_dataset(tmp_path / "data", num_labeled=4, num_unlabeled=12, num_val=2, image_size=32)
    split = synthetic.split_files["unlabeled"]
    alone = load_source("pascal", synthetic.root, split, cache_dir=tmp_path / "alone")
    shared = load_source("pascal", synthetic.root, split, cache_dir=tmp_path / "shared", num_proc=2)
    assert len(shared.cache_files) == 2  # really built by two processes
    assert shared._fingerprint == alone._fingerprint and shared.data.table.equals(alone.data.table)
