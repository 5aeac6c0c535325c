"""A process that cannot join the others says where it tried to connect (stpp_hf.training.distributed)."""

import socket
import subprocess
import sys

import pytest
from helpers import REPO, free_port, script_env

# what a launcher without an agent (srun, mpirun, a hand-made launch) gives one process of two
JOIN = """
from datetime import timedelta
from accelerate.utils import InitProcessGroupKwargs
from stpp_hf.training.distributed import create_accelerator

create_accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=2))])
"""


@pytest.mark.parametrize(
    "rank, expected",
    [
        ("1", "process 1 of 2 on {host} could not reach the main process at 127.0.0.1:{port}"),
        ("0", "process 0 of 2 on {host} hosts the rendezvous at 127.0.0.1:{port} and not all other processes joined"),
    ],
)
def test_a_failed_rendezvous_names_the_address_and_port(rank, expected):
    port = free_port()  # nobody listens there (rank 1), nobody else joins (rank 0)
    env = dict(
        script_env(),
        ACCELERATE_USE_CPU="true",
        RANK=rank,
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    command = [sys.executable, "-c", JOIN]
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    prefix = "stpp_hf.training.distributed.RendezvousError:"
    error = [line for line in completed.stderr.splitlines() if line.startswith(prefix)]
    assert len(error) == 1, completed.stderr[-3000:]
    assert expected.format(host=socket.gethostname(), port=port) in error[0]
    assert "--main_process_ip" in error[0]
