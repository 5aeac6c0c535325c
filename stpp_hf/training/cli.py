"""``stpp-train`` (and ``examples/train_stpp.py``): SupOnly / ST / ST++ end to end with Accelerate.

    accelerate launch -m stpp_hf.training.cli --output_dir runs/demo                  # synthetic data, ST++
    stpp-train examples/recipes/pascal-1_16-r50.yaml --data_root VOCdevkit/VOC2012    # a paper recipe
    stpp-train examples/recipes/pascal-1_16-r50.yaml --data_root VOC2012 --dry_run    # print it, train nothing

Relaunching the same command in the same ``--output_dir`` resumes the run; a relaunch with settings or
data that differ from the saved ``run_config.json`` is refused before anything in the run directory changes.
SIGTERM / SIGINT / SIGUSR1 stop it after saving what the relaunch resumes from, with exit code
:data:`~stpp_hf.training.preemption.PREEMPTED_EXIT_CODE` (docs/preemption.md).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

from .config import launch_precision, resolve_run_config
from .distributed import create_accelerator
from .divergence import NonFiniteError
from .dry_run import describe_recipe
from .errors import ConfigError
from .options import parse_arguments
from .pipeline import run_pipeline
from .precision import gather_precision_decision
from .preemption import PREEMPTED_EXIT_CODE, Preempted, exit_with_launcher, stop_handlers
from .results import results_table
from .run_data import load_run_data, run_settings
from .run_directory import open_run_directory
from .run_layout import RunLayout


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), then print the recipe (``--dry_run``) or train; returns 0."""
    data_args, model_args, run_args, paper = parse_arguments(argv)  # checks each option
    accelerator = _accelerator(run_args)
    # checks the options against each other: a bad one fails here, before any data work
    config = resolve_run_config(data_args, model_args, run_args, accelerator.num_processes, accelerator.device.type)
    # the precision must suit the device of every process, known before any data work or run directory
    precision = gather_precision_decision(accelerator, config.run.allow_emulated_precision)
    if config.run.dry_run:
        if accelerator.is_main_process:
            print(describe_recipe(config, paper))
            print("\n".join(precision.describe()))
        return 0
    precision.check()
    output_dir = Path(config.run.output_dir)
    heartbeat = open_run_directory(accelerator, output_dir, config.record(), config.run.heartbeat_timeout_s)
    data, record = load_run_data(accelerator, config, output_dir)
    settings = run_settings(config, data, record, {"precision": precision.to_json(), **data.metadata})
    if config.run.report_to != "none":
        # TensorBoard's hparams accept only scalars and strings
        scalars = {key: value for key, value in config.record().items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("stpp", config=scalars)
    results = run_pipeline(accelerator, data, settings, claimed=True)
    if heartbeat is not None:  # every process is here: the main process may push alone from now on
        heartbeat.stop()
    accelerator.end_training()
    if accelerator.is_main_process:
        print(results_table(results))
        print(f"run directory: {output_dir} (final model in {RunLayout(output_dir).final})")
        if config.run.push_to_hub:
            from stpp_hf.hub import push_run_to_hub

            url = push_run_to_hub(
                output_dir,
                config.run.hub_model_id,
                private=config.run.hub_private,
                push_stages=config.run.push_stage_branches,
            )
            print(f"pushed to {url}")
    return 0


def _accelerator(run_args):
    """The launch's Accelerator, with the logging of a run (one process speaks; no per-file or per-shard lines)."""
    import transformers
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    output_dir = Path(run_args.output_dir)
    accelerator = create_accelerator(
        mixed_precision=launch_precision(run_args),
        gradient_accumulation_steps=run_args.gradient_accumulation_steps,
        log_with=None if run_args.report_to == "none" or run_args.dry_run else run_args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(RunLayout(output_dir).logs)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=run_args.collective_timeout_s))],
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    transformers.utils.logging.disable_progress_bar()  # per-shard bars on every save / load
    return accelerator


def console_main() -> None:
    """The ``stpp-train`` console script: a bad option or a diverged training is one line that names it, not a
    traceback; a stop signal saves, prints one line and exits with :data:`PREEMPTED_EXIT_CODE`."""
    exit_with_launcher()
    try:
        with stop_handlers():
            sys.exit(main())
    except (ConfigError, NonFiniteError) as error:
        sys.exit(f"stpp-train: error: {error}")
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":  # one line for the run, not one per process
            print(
                f"stpp-train: {stop}; relaunch the same command to resume (exit code {PREEMPTED_EXIT_CODE})",
                flush=True,
            )
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    console_main()
