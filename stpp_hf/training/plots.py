"""Result pictures of a run and of a comparison of runs, drawn with matplotlib (Agg, no display needed).

Each picture has a fixed size in pixels (:data:`FIGURE_SIZES`, width x height), so a card lays out the same for any
run. A run's pictures are drawn from its :class:`~stpp_hf.training.results.RunResults` alone: val mIoU per epoch of
every training stage (the stages' ``history``), the val confusion matrix of a model normalised per true class, and
the per-class IoU of every stage side by side. Figures are built with ``matplotlib.figure.Figure`` rather than
pyplot, so nothing global is touched.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..file_io import atomic_write_bytes
from .results import STAGE_TITLES, RunResults
from .run_layout import RunLayout

DPI = 100
# (width, height) in pixels of each picture
FIGURE_SIZES = {
    "val_miou_per_epoch": (800, 450),
    "confusion": (640, 560),
    "per_class_iou": (900, 450),
    "comparison": (800, 450),
}


def _figure(kind: str) -> Figure:
    width, height = FIGURE_SIZES[kind]
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> None:
    """PNG of exactly the figure's size (no tight bounding box), written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def stage_title(index: int, name: str) -> str:
    """``"1 SupOnly"``: a training stage's position in the run (from 0) and its title."""
    return f"{index + 1} {STAGE_TITLES.get(name, name)}"


def plot_val_miou_per_epoch(results: RunResults, path: str | Path) -> bool:
    """Val mIoU (%) after each epoch of every training stage, one line each, the best epoch marked.

    Returns whether it was drawn (``False`` when no stage recorded its epochs)."""
    stages = [(index, stage) for index, stage in results.training_stages() if stage.history]
    if not stages:
        return False
    figure = _figure("val_miou_per_epoch")
    axes = figure.add_subplot()
    for index, stage in stages:
        epochs = [entry["epoch"] for entry in stage.history]
        mious = [100 * entry["val_miou"] for entry in stage.history]
        (line,) = axes.plot(epochs, mious, marker="o", markersize=3, label=stage_title(index, stage.name))
        if stage.best_epoch in epochs:
            best = mious[epochs.index(stage.best_epoch)]
            axes.plot(stage.best_epoch, best, "*", markersize=12, color=line.get_color())
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("val mIoU (%)")
    axes.set_title("Val mIoU per epoch of every training stage (star: the best epoch, which the stage keeps)")
    axes.grid(alpha=0.3)
    axes.legend()
    _save(figure, path)
    return True


def normalized_confusion(matrix: Sequence[Sequence[int]]) -> np.ndarray:
    """Each row (true class) divided by its pixel count; a class with no val pixels is a row of NaN."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: str | Path) -> None:
    """The val confusion matrix normalised per true class (rows sum to 1), fractions written in the cells."""
    normalized = normalized_confusion(matrix)
    figure = _figure("confusion")
    axes = figure.add_subplot()
    image = axes.imshow(normalized, vmin=0, vmax=1, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, label="fraction of the true class's pixels")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 6 else 0)
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    if len(class_names) <= 12:  # the numbers stay legible
        for row, column in np.ndindex(normalized.shape):
            value = normalized[row, column]
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
            axes.text(column, row, text, ha="center", va="center", color="white" if value > 0.5 else "black")
    _save(figure, path)


def plot_per_class_iou(results: RunResults, path: str | Path) -> None:
    """Grouped bars: per class, the IoU (%) of every training stage's best model and of the final model."""
    names = results.class_names()
    columns = [(stage_title(index, stage.name), stage.per_class_iou) for index, stage in results.training_stages()]
    columns.append((f"final ({results.framework})", results.final.per_class_iou))
    figure = _figure("per_class_iou")
    axes = figure.add_subplot()
    width = 0.8 / len(columns)
    positions = np.arange(len(names))
    for offset, (label, table) in enumerate(columns):
        values = [100 * table[name] if table.get(name) is not None else np.nan for name in names]
        axes.bar(positions + (offset - (len(columns) - 1) / 2) * width, values, width, label=label)
    axes.set_xticks(positions, names, rotation=90 if len(names) > 8 else 0)
    axes.set_ylabel("val IoU (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Per-class val IoU of every stage (no bar: the class is absent from val)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)


def plot_comparison(
    row_names: Sequence[str], runs: Sequence[tuple[str, Sequence[float | None]]], path: str | Path
) -> None:
    """Val mIoU (%) of each run at each row (training stages, then the final model), with the runs' mean and its
    sample standard deviation as a band.

    Args:
        row_names: the x axis, e.g. ``["1 SupOnly", ..., "final"]``.
        runs: ``(label, [mIoU fraction or None per row])`` of each run.
    """
    figure = _figure("comparison")
    axes = figure.add_subplot()
    positions = np.arange(len(row_names))
    values = np.array([[np.nan if value is None else 100 * value for value in mious] for _, mious in runs])
    for (label, _), row in zip(runs, values):
        axes.plot(positions, row, marker="o", alpha=0.6, label=label)
    mean = np.nanmean(values, axis=0)
    if len(runs) > 1:
        spread = np.nanstd(values, axis=0, ddof=1)
        axes.fill_between(positions, mean - spread, mean + spread, color="black", alpha=0.12, label="mean ± std")
    axes.plot(positions, mean, color="black", linewidth=2, label="mean")
    axes.set_xticks(positions, row_names, rotation=15)
    axes.set_ylabel("val mIoU (%)")
    axes.set_title(f"Val mIoU of {len(runs)} runs per stage (std: sample standard deviation, ddof=1)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, path)


def draw_run_figures(results: RunResults, layout: RunLayout) -> dict[str, str]:
    """Draw the pictures of a finished run into ``layout.figures()``; ``{name: path relative to the run}`` of those
    drawn (a confusion matrix or the epoch curves are left out when ``results`` lacks them: older runs)."""
    paths = layout.figures()
    drawn = []
    if plot_val_miou_per_epoch(results, paths["val_miou_per_epoch"]):
        drawn.append("val_miou_per_epoch")
    names = results.class_names()
    if results.final.confusion_matrix is not None:
        title = f"Final model ({results.framework}): val confusion, normalised per true class"
        plot_confusion(results.final.confusion_matrix, names, title, paths["confusion_final"])
        drawn.append("confusion_final")
    stages = results.training_stages()
    first = stages[0][1]
    if len(stages) > 1 and first.confusion_matrix is not None:  # SupOnly, when it is not the final model itself
        title = f"{STAGE_TITLES.get(first.name, first.name)}: val confusion, normalised per true class"
        plot_confusion(first.confusion_matrix, names, title, paths["confusion_suponly"])
        drawn.append("confusion_suponly")
    plot_per_class_iou(results, paths["per_class_iou"])
    drawn.append("per_class_iou")
    return {name: layout.relative(paths[name]) for name in drawn}


__all__ = [
    "FIGURE_SIZES",
    "draw_run_figures",
    "plot_comparison",
    "plot_confusion",
    "plot_per_class_iou",
    "plot_val_miou_per_epoch",
    "stage_title",
]
