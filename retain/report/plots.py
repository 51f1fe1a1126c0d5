"""Accuracy plots of one or more runs.

Figures are drawn on an explicit Agg canvas (no pyplot, no display, global matplotlib backend untouched).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from retain.report.tables import PathLike, _as_run_dirs, accuracy_matrix, load_run

__all__ = ["plot_runs"]

_MAX_HEATMAP_COLS = 3
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
    dirs = _as_run_dirs(run_dirs)
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

    finite = [np.nanmax(A) for A in mats if A is not None and np.any(np.isfinite(A))]
    vmax = max([100.0] + finite)
    inner = outer[0, 1].subgridspec(n_rows, n_cols)
    image = None
    for k, (A, run, label) in enumerate(zip(mats, runs, labels, strict=True)):
        hax = fig.add_subplot(inner[k // n_cols, k % n_cols])
        hax.set_title(f"{run.get('run', label)}\n{label}", fontsize="small")
        if A is None:
            hax.text(0.5, 0.5, "no finished tasks", ha="center", va="center", transform=hax.transAxes)
            hax.set_axis_off()
            continue
        T = A.shape[0]
        shown = np.where(np.tri(T, dtype=bool), A, np.nan)
        image = hax.imshow(np.ma.masked_invalid(shown), vmin=0.0, vmax=vmax, cmap="viridis")
        hax.set_xlabel("task i")
        hax.set_ylabel("after task t")
        hax.set_xticks(range(T))
        hax.set_yticks(range(T))
        if T <= _MAX_ANNOTATED_TASKS:
            for t in range(T):
                for i in range(t + 1):
                    if np.isfinite(shown[t, i]):
                        color = "white" if shown[t, i] < 0.6 * vmax else "black"
                        hax.text(i, t, f"{shown[t, i]:.0f}", ha="center", va="center", fontsize=7, color=color)
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1:], shrink=0.8, label="accuracy (%)")
    if title:
        fig.suptitle(title)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path
