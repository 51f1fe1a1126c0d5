"""Reports: read run directories (``metrics.json``) and write tables and plots.

Runs write data, reports read data: metrics are recomputed from each run's accuracy matrix. ``write_report`` writes
one self-contained HTML page and its Markdown twin; ``compare`` is the same tables for the terminal. Runs that
differ only in ``seed`` are grouped and reported as mean ± sample std (ddof=1) and n.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from retain.metrics import summarize
from retain.report.document import Block, Bullets, Code, Details, Heading, Image, Table, Text, to_html, to_md
from retain.report.groups import GROUP_COLUMNS, Group, expand_run_dirs, group_rows, group_runs
from retain.report.plots import plot_curves, plot_forgetting, plot_matrices, plot_runs
from retain.report.tables import (
    COLUMNS,
    METRICS_FILE,
    PathLike,
    accuracy_matrix,
    as_run_dirs,
    format_matrix,
    load_run,
    summary_rows,
    to_csv,
    to_markdown,
    to_text,
)

__all__ = [
    "COLUMNS",
    "GROUP_COLUMNS",
    "METRICS_FILE",
    "accuracy_matrix",
    "compare",
    "expand_run_dirs",
    "format_matrix",
    "group_rows",
    "group_runs",
    "load_run",
    "plot_curves",
    "plot_forgetting",
    "plot_matrices",
    "plot_runs",
    "summary_rows",
    "to_csv",
    "to_markdown",
    "to_text",
    "write_report",
]

REPORT_FILE = "report.md"
HTML_FILE = "report.html"
CSV_FILE = "summary.csv"
GROUPS_CSV_FILE = "groups.csv"
PLOT_FILE = "accuracy.png"
FORGETTING_FILE = "forgetting.png"
MATRICES_FILE = "matrices.png"

NOTE = (
    "Metrics are recomputed from each run's accuracy matrix (percent; see docs/metrics.md): avg acc after the last "
    "finished task; forgetting = max_upto definition (DualPrompt, LN tuning), forgetting (FACIL) = max_before; "
    "task-id acc at the last finished task; task-IL runs: the accuracy columns are task-aware (TAw), TAg the "
    "task-agnostic view; k-NN: retention of the pre-training domain before training and after the last task; "
    "bytes/task: what a deployment keeps to serve a task beyond what it keeps without it, by the row's bytes rule "
    "(stream: per-task tensors, shared ones belong to the model; deployment: one task per deployment, everything it "
    "changed); train and test time summed over tasks."
)
GROUP_NOTE = (
    "Runs whose resolved configs differ only in `seed` (and `name`, `out_dir`), with as many finished tasks, form a "
    "group: each cell is mean ± sample standard deviation (ddof=1) over its n runs."
)

_METRIC_LABELS = {
    "average_accuracy": "average accuracy",
    "average_incremental_accuracy": "average incremental accuracy",
    "forgetting": "forgetting (max_upto)",
    "forgetting_max_before": "forgetting (max_before, FACIL)",
    "backward_transfer": "backward transfer",
}


def compare(paths: PathLike | Iterable[PathLike]) -> str:
    """The report's tables as aligned plain text: one row per run, then one per group of seeds (if any has two
    or more runs).

    Args:
        paths: Run directories, sweep folders or folders of runs.
    """
    dirs = expand_run_dirs(paths)
    rows = summary_rows(dirs)
    text = to_text(rows)
    groups = group_runs(dirs, rows)
    if any(g.n > 1 for g in groups):
        text += "\nover seeds: mean ± sample std (ddof=1)\n" + to_text(group_rows(groups), GROUP_COLUMNS)
    return text


def _run_blocks(run_dir: Path) -> list[Block]:
    run = load_run(run_dir)
    A = accuracy_matrix(run)
    name = run.get("run", run_dir.name)
    blocks: list[Block] = [Heading(3, str(name)),
                           Text(f"`{run_dir}` - method `{run.get('method', '-')}`, backbone "
                                f"`{run.get('backbone', '-')}`, seed {run.get('seed', '-')}")]  # fmt: skip
    if A is None:
        return blocks + [Text("No finished tasks yet."), *_config_block(run_dir)]
    blocks += [Text("Accuracy matrix (row t: after training task t; column i: task i):"), Code(format_matrix(A))]
    try:
        summary = summarize(A)
    except ValueError as e:
        return blocks + [Text(f"Metrics unavailable: {e}"), *_config_block(run_dir)]
    items = [f"{_METRIC_LABELS[k]}: {v:.2f}" for k, v in summary.items() if k in _METRIC_LABELS]
    tid = run.get("task_id_accuracy")
    if isinstance(tid, list) and any(v is not None for v in tid[: A.shape[0]]):
        steps = ", ".join("-" if v is None else f"{float(v):.1f}" for v in tid[: A.shape[0]])
        items.append(f"task-id accuracy after each task: {steps}")
    knn = run.get("retention_knn")
    if isinstance(knn, list) and knn:  # the pre-training domain's weighted k-NN: before training, then per task
        after = ", ".join(f"{float(v):.1f}" for v in knn[1 : A.shape[0] + 1]) or "-"
        items.append(f"retention k-NN accuracy: before training {float(knn[0]):.1f}; after each task: {after}")
    return blocks + [Bullets(items), *_config_block(run_dir)]


def _config_block(run_dir: Path) -> list[Block]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    return [Details("resolved config (config.yaml)", path.read_text(encoding="utf-8"))]


def _figures(dirs: list[Path], groups: list[Group], out: Path) -> list[Block]:
    curves = plot_curves(groups, out / PLOT_FILE)
    bars = plot_forgetting(groups, out / FORGETTING_FILE)
    mats = plot_matrices(dirs, out / MATRICES_FILE)
    return [Heading(2, "Accuracy after each task"), Image(curves, "accuracy"),
            Heading(2, "Forgetting per task"), Image(bars, "forgetting per task"),
            Heading(2, "Accuracy matrices"), Image(mats, "accuracy matrices")]  # fmt: skip


def write_report(run_dirs: PathLike | Iterable[PathLike], out_dir: PathLike) -> Path:
    """Writes ``report.html`` (self-contained) and its twin ``report.md`` with ``accuracy.png``,
    ``forgetting.png``, ``matrices.png``, ``summary.csv`` (and ``groups.csv`` when runs repeat over seeds).

    Args:
        run_dirs: Run directories, sweep folders or folders of runs (a single path is accepted too).
        out_dir: Output directory (created if needed).

    Returns:
        Path of the written ``report.md`` (the HTML page is next to it).
    """
    if not as_run_dirs(run_dirs):
        raise ValueError("write_report needs at least one run directory")
    dirs = expand_run_dirs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(dirs)
    groups = group_runs(dirs, rows)
    to_csv(rows, out / CSV_FILE)
    blocks: list[Block] = [Heading(1, "retain report"), Text(NOTE), Heading(2, "Runs"), Table(rows)]
    if any(g.n > 1 for g in groups):
        g_rows = group_rows(groups)
        to_csv(g_rows, out / GROUPS_CSV_FILE, GROUP_COLUMNS)
        blocks += [Heading(2, "Over seeds"), Text(GROUP_NOTE), Table(g_rows, GROUP_COLUMNS)]
    blocks += _figures(dirs, groups, out)
    blocks += [Heading(2, "Each run")] + [b for d in dirs for b in _run_blocks(d)]
    (out / HTML_FILE).write_text(to_html(blocks, "retain report"), encoding="utf-8")
    report = out / REPORT_FILE
    report.write_text(to_md(blocks), encoding="utf-8")
    return report
