"""Training: the ST / ST++ stages on Accelerate and the run configuration (the ``stpp-train`` entry point is
``stpp_hf.training.cli``)."""

from .config import RunConfig, resolve_run_config
from .distributed import check_shared_run_dir, create_accelerator
from .errors import ConfigError
from .evaluation import evaluate
from .options import parse_arguments
from .pipeline import RunSettings, run_pipeline
from .pseudo_label_export import pseudo_label_dataset
from .pseudo_labeling import label_images
from .results import FinalSummary, RunResults, StageSummary, results_table
from .run_layout import RunLayout, StageLayout
from .selection import compute_reliability, split_by_reliability
from .stages import Stage, build_stages, snapshot_epochs
from .trainer import train_stage

__all__ = [
    "ConfigError",
    "FinalSummary",
    "RunConfig",
    "RunLayout",
    "RunResults",
    "RunSettings",
    "Stage",
    "StageLayout",
    "StageSummary",
    "build_stages",
    "check_shared_run_dir",
    "compute_reliability",
    "create_accelerator",
    "evaluate",
    "label_images",
    "parse_arguments",
    "pseudo_label_dataset",
    "resolve_run_config",
    "results_table",
    "run_pipeline",
    "snapshot_epochs",
    "split_by_reliability",
    "train_stage",
]
