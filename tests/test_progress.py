"""Progress bars write a handful of refreshes, not a line per step, when their stream is not a terminal."""

import io
import itertools
import time
from types import SimpleNamespace

from stpp_hf.progress import NON_TERMINAL_INTERVAL_S
from stpp_hf.training.trainer import _progress

STEPS = 300


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_training_bar(stream):
    """The trainer's bar over ``STEPS`` steps of one simulated second each (a fake clock, no waiting)."""
    bar = _progress(SimpleNamespace(is_local_main_process=True), total=STEPS, desc="1-suponly", file=stream)
    clock = itertools.count(time.time(), 1.0)
    bar._time = lambda: next(clock)
    for step in range(STEPS):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", lr="1.00e-03", refresh=False)  # as train_stage does
    bar.close()
    return bar


def test_the_training_bar_on_a_non_terminal_stream_refreshes_every_few_seconds_at_most():
    log = io.StringIO()
    run_training_bar(log)
    # each refresh is a "\r" (a line in a log): one per NON_TERMINAL_INTERVAL_S simulated seconds, not one per step
    assert log.getvalue().count("\r") <= STEPS / NON_TERMINAL_INTERVAL_S + 3, log.getvalue().count("\r")
    assert f"{STEPS}/{STEPS}" in log.getvalue()


def test_the_training_bar_on_a_terminal_keeps_tqdm_defaults():
    terminal = Terminal()
    bar = run_training_bar(terminal)
    assert bar.mininterval == 0.1 and terminal.getvalue().count("\r") > STEPS / 2
