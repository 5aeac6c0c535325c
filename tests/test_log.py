"""The package's loggers: accelerate's multi-process logger, and plain logging where no Accelerator exists."""

import logging

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from stpp_hf.data.splits import check_split_overlap
from stpp_hf.log import get_logger


def reset_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_a_warning_without_an_accelerator_is_logged_plainly(caplog):
    # accelerate's own adapter raises RuntimeError here; data code also runs from scripts and tests
    reset_accelerate_state()
    with caplog.at_level(logging.WARNING):
        check_split_overlap(["a", "b"], ["b", "c"], ["d"])
    (record,) = caplog.records
    assert record.getMessage().startswith("1 of 2 labeled images are also in the unlabeled set (e.g. b)")
    assert record.name == "stpp_hf.data.splits" and record.funcName == "check_split_overlap"


def test_with_an_accelerator_the_main_process_logs_through_accelerate(caplog):
    reset_accelerate_state()
    Accelerator(cpu=True)
    logger = get_logger("stpp_hf.test")
    with caplog.at_level(logging.INFO):
        logger.info("once per run")
        logger.info("per process", main_process_only=False)
    assert [record.getMessage() for record in caplog.records] == ["[RANK 0] once per run", "[RANK 0] per process"]
    assert {record.funcName for record in caplog.records} == {
        "test_with_an_accelerator_the_main_process_logs_through_accelerate"
    }
    reset_accelerate_state()
