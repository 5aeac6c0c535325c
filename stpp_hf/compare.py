"""Several finished runs (seeds, splits or settings) in one table: ``stpp-compare RUN_DIR... --output-dir DIR``.

:func:`compare_runs` reads each run's ``results.json`` (:class:`~stpp_hf.training.results.RunResults`), refuses runs
that are not comparable (another dataset or val set, other classes, framework, model or backbone), and aggregates
the val mIoU of every training stage and of the final model, and the per-class IoU, into mean, sample standard
deviation (``ddof=1``; none for a single run), min, max and the number of runs. The settings that differ between
the runs are read from their recorded configurations (``results.json`` ``config``) and named in the header.
:meth:`Comparison.write` gives ``comparison.md``, ``comparison.json`` and ``comparison.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .file_io import atomic_write_json, atomic_write_text
from .training.plots import plot_comparison, stage_title
from .training.results import RunResults
from .training.run_record import NON_RESULT_SETTINGS, migrate_record

STD_NAME = "sample standard deviation (ddof=1)"
# what runs must share to be compared: (name, how to read it from a run)
IDENTITY = (
    ("dataset", lambda results: results.dataset),
    ("framework", lambda results: results.framework),
    ("model", lambda results: results.model),
    ("backbone", lambda results: results.backbone),
    ("classes", lambda results: results.id2label),
    ("training stages", lambda results: [stage.name for _, stage in results.training_stages()]),
    ("val set", lambda results: _val_set(results)),
)
# description fields compared when a run has no recorded configuration (older results.json)
DESCRIPTION_SETTINGS = (
    "split",
    "output_stride",
    "epochs",
    "global_batch_size",
    "lr",
    "crop_size",
    "pretrained_backbone",
)
SPLIT_SETTINGS = {"split", "labeled_id_path", "unlabeled_id_path", "data.labeled", "data.unlabeled"}
OUTPUT_FILES = ("comparison.md", "comparison.json", "comparison.png")


class IncomparableRunsError(ValueError):
    """The runs differ in what makes their numbers comparable; the message names the difference."""


def aggregate(values: Sequence[float | None]) -> dict:
    """``{"n", "mean", "std", "min", "max"}`` of the measured values (``None`` and NaN left out); ``std`` is the
    sample standard deviation (``ddof=1``), ``None`` with fewer than two values; all ``None`` with none."""
    present = [float(value) for value in values if value is not None and not math.isnan(value)]
    if not present:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(present),
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "min": min(present),
        "max": max(present),
    }


def _val_set(results: RunResults) -> Any:
    """What a run's val set is: the recorded fingerprint of its files, or for the built-in synthetic data (made anew
    in each run directory, so its file fingerprints differ) the settings that generate it."""
    config = results.config or {}
    val = (config.get("data") or {}).get("val")
    if config.get("synthetic") is not None:
        return {"synthetic": config["synthetic"], "num_images": (val or {}).get("num_images")}
    return val


def _flatten(config: dict) -> dict[str, Any]:
    """The configuration with its ``data`` record spread into ``data.labeled``, ``data.unlabeled``, ``data.val``."""
    flat = {key: value for key, value in config.items() if key != "data"}
    flat.update({f"data.{key}": value for key, value in (config.get("data") or {}).items()})
    return flat


def _settings(results: RunResults) -> dict[str, Any]:
    """The settings of a run that can change its numbers: its recorded configuration, else its description."""
    if results.config is None:
        return {name: getattr(results, name) for name in DESCRIPTION_SETTINGS}
    config = migrate_record(results.config)  # an earlier version's run compares in today's names
    settings = {key: value for key, value in _flatten(config).items() if key not in NON_RESULT_SETTINGS}
    if results.config.get("synthetic") is not None:  # its settings say what the data is; file fingerprints differ
        settings = {key: value for key, value in settings.items() if not key.startswith("data.")}
    return settings


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


@dataclass(frozen=True)
class Comparison:
    """The aggregate of several comparable runs (:func:`compare_runs`).

    ``rows`` holds one entry per training stage and one for the final model: ``{"name", "title", "values" (val mIoU
    fraction of each run, None if not measured), "n", "mean", "std", "min", "max", "lower_than_previous"}``, the last
    the number of runs whose stage scored lower on val than the stage before it. ``per_class_iou`` is ``{class:
    {row title: aggregate}}``; ``differences`` ``{setting: [value of each run]}``; ``identity`` what they share.
    """

    run_dirs: tuple[str, ...]
    labels: tuple[str, ...]
    identity: dict[str, Any]
    differences: dict[str, list]
    recorded_configs: bool
    rows: tuple[dict, ...]
    per_class_iou: dict[str, dict[str, dict]]

    @property
    def num_runs(self) -> int:
        return len(self.run_dirs)

    @property
    def noun(self) -> str:
        """``"3 seeds"``, ``"3 splits"`` or ``"3 runs"``: what the runs vary."""
        keys = set(self.differences)
        if keys == {"seed"}:
            kind = "seed" if self.num_runs == 1 else "seeds"
        elif keys and keys <= SPLIT_SETTINGS:
            kind = "split" if self.num_runs == 1 else "splits"
        else:
            kind = "run" if self.num_runs == 1 else "runs"
        return f"{self.num_runs} {kind}"

    def row(self, name: str) -> dict:
        return next(row for row in self.rows if row["name"] == name)

    def to_json(self) -> dict:
        return {
            "std": STD_NAME,
            "runs": [{"run_dir": run_dir, "label": label} for run_dir, label in zip(self.run_dirs, self.labels)],
            "identity": self.identity,
            "differences": self.differences,
            "recorded_configs": self.recorded_configs,
            "rows": list(self.rows),
            "per_class_iou": self.per_class_iou,
        }

    def header(self) -> str:
        """One sentence: what the runs share, what differs between them, which standard deviation."""
        shared = ", ".join(f"{name} {self.identity[name]}" for name in ("framework", "dataset", "model", "backbone"))
        if self.differences:
            differing = "; ".join(
                f"{name} ({', '.join(_short(value) for value in values)})" for name, values in self.differences.items()
            )
        else:
            differing = "none"
        source = (
            "their recorded configurations" if self.recorded_configs else "results.json (no recorded configuration)"
        )
        return f"{self.noun} ({shared}). Settings that differ, from {source}: {differing}. Std is the {STD_NAME}."

    def to_markdown(self) -> str:
        """The two tables (val mIoU per stage and run; per-class IoU mean ± std) under :meth:`header`."""
        percent = _percent_cell
        lines = [self.header(), ""]
        columns = [*self.labels, "mean ± std", "min", "max", "n", "runs lower than the stage before"]
        lines += [f"| val mIoU (%) | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
        for row in self.rows:
            lower = "" if row["lower_than_previous"] is None else f"{row['lower_than_previous']} of {row['n']}"
            cells = [percent(value) for value in row["values"]]
            cells += [mean_std_cell(row), percent(row["min"]), percent(row["max"]), str(row["n"]), lower]
            lines.append(f"| {row['title']} | {' | '.join(cells)} |")
        titles = [row["title"] for row in self.rows]
        lines += ["", f"| per-class val IoU (%), mean ± std | {' | '.join(titles)} |"]
        lines.append("|---" * (len(titles) + 1) + "|")
        for name, by_row in self.per_class_iou.items():
            cells = [mean_std_cell(by_row[title]) + _count_note(by_row[title], self.num_runs) for title in titles]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> None:
        """``comparison.png``: val mIoU of each run per row, the mean and a ± std band."""
        runs = [(label, [row["values"][index] for row in self.rows]) for index, label in enumerate(self.labels)]
        plot_comparison([row["title"] for row in self.rows], runs, path)

    def write(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write :data:`OUTPUT_FILES` into ``output_dir`` (created); returns their paths by name."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {name: output_dir / name for name in OUTPUT_FILES}
        atomic_write_text(paths["comparison.md"], self.to_markdown())
        atomic_write_json(paths["comparison.json"], self.to_json())
        self.plot(paths["comparison.png"])
        return paths


def _percent_cell(fraction: float | None) -> str:
    return "n/a" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.2f}"


def mean_std_cell(stats: dict) -> str:
    """``"47.50 ± 0.50"`` (%) of an :func:`aggregate`; the mean alone for one run; ``"n/a"`` for none."""
    if stats["mean"] is None:
        return "n/a"
    if stats["std"] is None:
        return f"{100 * stats['mean']:.2f}"
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def _count_note(stats: dict, num_runs: int) -> str:
    """`` (2 runs)`` when a class was measured in fewer runs than there are (absent from some val set)."""
    return "" if stats["n"] in (0, num_runs) else f" ({stats['n']} runs)"


def _check_comparable(runs: Sequence[RunResults]) -> dict[str, Any]:
    """What the runs share (:data:`IDENTITY`); raises :class:`IncomparableRunsError` naming the first difference."""
    identity = {}
    for name, read in IDENTITY:
        values = [read(results) for results in runs]
        different = [results for results, value in zip(runs, values) if value != values[0]]
        if different:
            raise IncomparableRunsError(
                f"runs with another {name} are not comparable: {runs[0].source} has {_short(values[0])}, "
                f"{different[0].source} has {_short(read(different[0]))}; compare runs of one {name}"
            )
        identity[name] = values[0]
    return identity


def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> Comparison:
    """Aggregate the finished runs in ``run_dirs`` (at least one, each once).

    Raises:
        FileNotFoundError / ValueError: a directory holds no valid ``results.json``.
        IncomparableRunsError: the runs differ in dataset, val set, classes, framework, model or backbone.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    resolved = [Path(run_dir).resolve() for run_dir in run_dirs]
    repeated = next((run_dir for run_dir in resolved if resolved.count(run_dir) > 1), None)
    if repeated is not None:
        raise ValueError(f"{repeated} is given twice: each run counts once")
    runs = [RunResults.read(run_dir) for run_dir in run_dirs]
    identity = _check_comparable(runs)
    settings = [_settings(results) for results in runs]
    names = list(dict.fromkeys(name for setting in settings for name in setting))
    differences = {
        name: [setting.get(name) for setting in settings]
        for name in names
        if any(setting.get(name) != settings[0].get(name) for setting in settings)
    }
    labels = []
    for index, run_dir in enumerate(run_dirs):
        parts = [f"{name} {values[index]}" for name, values in differences.items() if len(str(values[index])) <= 24]
        labels.append(", ".join(parts) if parts and len(runs) > 1 else Path(run_dir).name)
    rows = []
    for position, name in enumerate(identity["training stages"]):
        values = [
            next(stage for _, stage in results.training_stages() if stage.name == name).val_miou for results in runs
        ]
        rows.append({"name": name, "title": stage_title(position, name), "values": values})
    rows.append(
        {"name": "final", "title": f"final ({identity['framework']})", "values": [r.final.val_miou for r in runs]}
    )
    for previous, row in zip([None, *rows], rows):
        row.update(aggregate(row["values"]))
        measured = previous is not None and row["name"] != "final"
        row["lower_than_previous"] = (
            sum(value < before for value, before in zip(row["values"], previous["values"])) if measured else None
        )
    per_class = {}
    for name in runs[0].class_names():
        tables = {row["title"]: [] for row in rows}
        for results in runs:
            stage_tables = [stage.per_class_iou for _, stage in results.training_stages()] + [
                results.final.per_class_iou
            ]
            for row, table in zip(rows, stage_tables):
                tables[row["title"]].append(table.get(name))
        per_class[name] = {title: aggregate(values) for title, values in tables.items()}
    return Comparison(
        run_dirs=tuple(str(run_dir) for run_dir in run_dirs),
        labels=tuple(labels),
        identity=identity,
        differences=differences,
        recorded_configs=all(results.config is not None for results in runs),
        rows=tuple(rows),
        per_class_iou=per_class,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stpp-compare",
        description="Aggregate finished stpp-train runs (seeds, splits, settings): mean, sample std, min, max, n.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories holding results.json.")
    parser.add_argument(
        "--output-dir", required=True, help="Where comparison.md, comparison.json and comparison.png are written."
    )
    args = parser.parse_args(argv)
    try:
        comparison = compare_runs(args.run_dirs)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"stpp-compare: error: {error}\n")
    paths = comparison.write(args.output_dir)
    print(comparison.to_markdown())
    print("written: " + ", ".join(str(path) for path in paths.values()))
    return 0


def console_main() -> None:
    """The ``stpp-compare`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()


__all__ = ["Comparison", "IncomparableRunsError", "aggregate", "compare_runs", "main", "mean_std_cell"]
