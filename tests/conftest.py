"""Fixtures shared by the test modules (plain helpers are in helpers.py)."""

import importlib.util
import os

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration
from helpers import INFER_PATH, LONG_LABELING_STPP_ARGS, REPO, run_script


def reset_accelerate_state():
    """Forget the process-wide accelerate singletons, so the next ``Accelerator`` takes its own settings."""
    AcceleratorState._reset_state(True)  # True: PartialState too
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts without an accelerate state left by another (a bf16 ``Accelerator`` in one test
    would otherwise be refused or reused in the next)."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture
def fresh_accelerator():
    """``fresh_accelerator(**kwargs)``: a new ``Accelerator`` with a seedable sampler (data seed 0), whatever
    accelerators came before it in the test."""

    def make(**kwargs):
        reset_accelerate_state()
        return Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0), **kwargs)

    return make


@pytest.fixture(scope="session")
def infer():
    """examples/infer.py loaded as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("stpp_infer_example", INFER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def stpp_run(tmp_path_factory):
    """``(run_dir, completed)``: one finished tiny ST++ run of the example (``LONG_LABELING_STPP_ARGS``), given a
    relative --output_dir as in the README's first command. test_train_e2e checks its artefacts (relaunching it
    changes nothing), test_resume compares its killed and relaunched runs with it: one run for both."""
    run_dir = tmp_path_factory.mktemp("stpp_run") / "run"
    return run_dir, run_script(os.path.relpath(run_dir, REPO), *LONG_LABELING_STPP_ARGS)
