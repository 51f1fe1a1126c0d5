"""Plots of runs and groups of runs: accuracy after each task (with std bands over seeds), forgetting per task and
accuracy-matrix heat-maps.

Figures are drawn on an explicit Agg canvas (no pyplot, no display, global matplotlib backend untouched).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator

from retain.metrics import forgetting_per_task
from retain.report.tables import PathLike, accuracy_matrix, as_run_dirs, load_run

if TYPE_CHECKING:
    from retain.report.groups import Group

__all__ = ["plot_curves", "plot_forgetting", "plot_matrices", "plot_runs"]

_MAX_HEATMAP_COLS = 3
_MAX_MATRIX_COLS = 4
_MAX_ANNOTATED_TASKS = 10


def _seen_task_average(A: np.ndarray) -> list[float]:
    """Mean accuracy over tasks 0..t after each task t (NaN entries ignored)."""
    out = []
    for t in range(A.shape[0]):
        row = A[t, : t + 1]
        out.append(float(np.nanmean(row)) if np.any(np.isfinite(row)) else math.nan)
    return out


def _labels(runs: list[dict]) -> list[str]:
    methods = [str(r.get("method", r.get("run", "?"))) for r in runs]
    if len(set(methods)) == len(methods):
        return methods
    return [f"{m} ({r.get('run', i)})" for i, (m, r) in enumerate(zip(methods, runs, strict=True))]


def plot_runs(run_dirs: PathLike | Iterable[PathLike], out_path: PathLike, title: str | None = None) -> Path:
    """Writes one PNG comparing runs and returns its path.

    Left panel: average accuracy over the tasks seen so far after each task, one line per run (labelled by method,
    plus the run name when methods repeat). Right: one accuracy-matrix heat-map per run (``A[t, i]``: rows = after
    task t, columns = task i), in a grid of up to three columns.

    Args:
        run_dirs: Run directories holding ``metrics.json`` (a single path is accepted too).
        out_path: Where to write the PNG.
        title: Optional figure title.
    """
    dirs = as_run_dirs(run_dirs)
    if not dirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = [load_run(d) for d in dirs]
    mats = [accuracy_matrix(r) for r in runs]
    labels = _labels(runs)

    n = len(runs)
    n_cols = min(n, _MAX_HEATMAP_COLS)
    n_rows = math.ceil(n / n_cols)
    max_t = max([m.shape[0] for m in mats if m is not None] + [1])
    cell = max(2.6, min(4.5, 0.45 * max_t + 1.5))
    fig = Figure(figsize=(6.0 + cell * n_cols, max(4.2, cell * n_rows + 0.6)), layout="constrained")
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(1, 2, width_ratios=[6.0, cell * n_cols])

    ax = fig.add_subplot(outer[0, 0])
    for A, label in zip(mats, labels, strict=True):
        if A is None:
            continue
        xs = np.arange(1, A.shape[0] + 1)
        ax.plot(xs, _seen_task_average(A), marker="o", label=label)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy over seen tasks (%)")
    ax.set_title("Average accuracy after each task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if any(A is not None for A in mats):
        ax.legend(fontsize="small")

    vmax = _vmax(mats)
    inner = outer[0, 1].subgridspec(n_rows, n_cols)
    image = None
    for k, (A, run, label) in enumerate(zip(mats, runs, labels, strict=True)):
        hax = fig.add_subplot(inner[k // n_cols, k % n_cols])
        image = _draw_matrix(hax, A, f"{run.get('run', label)}\n{label}", vmax) or image
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1:], shrink=0.8, label="accuracy (%)")
    if title:
        fig.suptitle(title)
    return _save(fig, out_path, dpi=120)


def _draw_matrix(ax: Axes, A: np.ndarray | None, title: str, vmax: float) -> AxesImage | None:
    """One accuracy-matrix heat-map (``A[t, i]``: rows = after task t, columns = task i), annotated when small."""
    ax.set_title(title, fontsize="small")
    if A is None:
        ax.text(0.5, 0.5, "no finished tasks", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return None
    T = A.shape[0]
    shown = np.where(np.tri(T, dtype=bool), A, np.nan)  # (T, T), unused entries blank
    image = ax.imshow(np.ma.masked_invalid(shown), vmin=0.0, vmax=vmax, cmap="viridis")
    ax.set_xlabel("task i")
    ax.set_ylabel("after task t")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    if T <= _MAX_ANNOTATED_TASKS:
        for t in range(T):
            for i in range(t + 1):
                if np.isfinite(shown[t, i]):
                    color = "white" if shown[t, i] < 0.6 * vmax else "black"
                    ax.text(i, t, f"{shown[t, i]:.0f}", ha="center", va="center", fontsize=7, color=color)
    return image


def _vmax(mats: list[np.ndarray | None]) -> float:
    finite = [np.nanmax(A) for A in mats if A is not None and np.any(np.isfinite(A))]
    return max([100.0] + finite)


def _save(fig: Figure, out_path: PathLike, dpi: int = 110) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    return out_path


def plot_matrices(run_dirs: PathLike | Iterable[PathLike], out_path: PathLike) -> Path:
    """Writes one PNG with an accuracy-matrix heat-map per run (up to four per row, one colour scale)."""
    dirs = as_run_dirs(run_dirs)
    if not dirs:
        raise ValueError("plot_matrices needs at least one run directory")
    runs = [load_run(d) for d in dirs]
    mats = [accuracy_matrix(r) for r in runs]
    n_cols = min(len(runs), _MAX_MATRIX_COLS)
    n_rows = math.ceil(len(runs) / n_cols)
    max_t = max([m.shape[0] for m in mats if m is not None] + [1])
    cell = max(3.0, min(4.5, 0.45 * max_t + 1.5))
    fig = Figure(figsize=(cell * n_cols + 1.2, cell * n_rows + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    vmax = _vmax(mats)
    images = [_draw_matrix(ax, A, f"{r['run']}\n{r.get('method', '-')}", vmax)
              for ax, A, r in zip(axes.flat, mats, runs, strict=False)]  # fmt: skip
    for ax in axes.flat[len(runs) :]:
        ax.set_axis_off()
    image = next((im for im in images if im is not None), None)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy (%)")
    return _save(fig, out_path)


def _group_label(group: Group) -> str:
    return f"{group.label} (n={group.n}, mean ± std)" if group.n > 1 else group.label


def plot_curves(groups: Sequence[Group], out_path: PathLike) -> Path:
    """Writes one PNG: the average accuracy over the tasks seen so far after each task, one line per group (the
    mean over its seeds, with a band of ± one sample std where it has several)."""
    fig = Figure(figsize=(9.0, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for g in groups:
        curves = [_seen_task_average(A) for A in g.matrices if A is not None]
        if not curves:
            continue
        y = np.asarray(curves)  # (runs, tasks)
        xs = np.arange(1, y.shape[1] + 1)
        mean = np.nanmean(y, axis=0)  # (tasks,)
        (line,) = ax.plot(xs, mean, marker="o", label=_group_label(g))
        if y.shape[0] > 1:
            std = np.nanstd(y, axis=0, ddof=1)  # (tasks,)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy over seen tasks (%)")
    ax.set_title("Accuracy after each task")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out_path)


def _forgetting(group: Group) -> np.ndarray | None:
    """Per-task forgetting (max_upto) of each run of the group, ``(runs, tasks - 1)``; None below two tasks."""
    per_run = []
    for A in group.matrices:
        try:
            per_run.append(forgetting_per_task(A, "max_upto"))
        except ValueError:  # no matrix, or a missing evaluation
            continue
    if not per_run or not per_run[0]:
        return None
    return np.asarray(per_run)


def plot_forgetting(groups: Sequence[Group], out_path: PathLike) -> Path:
    """Writes one PNG: forgetting of each task after the last one (max_upto), bars per group (mean over seeds,
    error bar ± one sample std where it has several)."""
    fig = Figure(figsize=(9.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = [(g, f) for g in groups if (f := _forgetting(g)) is not None]
    width = 0.8 / max(len(bars), 1)
    for j, (g, per_task) in enumerate(bars):
        xs = np.arange(per_task.shape[1]) + (j - (len(bars) - 1) / 2) * width
        err = per_task.std(axis=0, ddof=1) if per_task.shape[0] > 1 else None
        ax.bar(xs, per_task.mean(axis=0), width, yerr=err, capsize=2, label=_group_label(g))
    if bars:
        n = max(f.shape[1] for _, f in bars)
        ax.set_xticks(range(n))
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "forgetting needs two or more finished tasks", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("task i")
    ax.set_ylabel("forgetting after the last task (%)")
    ax.set_title("Forgetting per task (max over earlier accuracies minus final)")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out_path)
