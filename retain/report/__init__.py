"""Reports: read run directories (``metrics.json``) and write tables and plots.

Runs write data, reports read data: metrics are recomputed from each run's accuracy matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from retain.metrics import summarize
from retain.report.plots import plot_runs
from retain.report.tables import (
    COLUMNS,
    METRICS_FILE,
    PathLike,
    _as_run_dirs,
    accuracy_matrix,
    format_matrix,
    load_run,
    summary_rows,
    to_csv,
    to_markdown,
)

__all__ = [
    "COLUMNS",
    "METRICS_FILE",
    "accuracy_matrix",
    "format_matrix",
    "load_run",
    "plot_runs",
    "summary_rows",
    "to_csv",
    "to_markdown",
    "write_report",
]

REPORT_FILE = "report.md"
CSV_FILE = "summary.csv"
PLOT_FILE = "accuracy.png"

_METRIC_LABELS = {
    "average_accuracy": "average accuracy",
    "average_incremental_accuracy": "average incremental accuracy",
    "forgetting": "forgetting (max_upto)",
    "forgetting_max_before": "forgetting (max_before, FACIL)",
    "backward_transfer": "backward transfer",
}


def _run_section(run_dir: Path) -> str:
    run = load_run(run_dir)
    A = accuracy_matrix(run)
    name = run.get("run", run_dir.name)
    head = f"### {name}\n\n`{run_dir}` - method `{run.get('method', '-')}`, backbone `{run.get('backbone', '-')}`"
    lines = [head, ""]
    if A is None:
        lines.append("No finished tasks yet.")
        return "\n".join(lines) + "\n"
    lines += ["Accuracy matrix (row t: after training task t; column i: task i):", "", "```text", format_matrix(A)]
    lines += ["```", ""]
    try:
        summary = summarize(A)
    except ValueError as e:
        lines.append(f"Metrics unavailable: {e}")
        return "\n".join(lines) + "\n"
    lines += [f"- {_METRIC_LABELS[k]}: {v:.2f}" for k, v in summary.items() if k in _METRIC_LABELS]
    tid = run.get("task_id_accuracy")
    if isinstance(tid, list) and any(v is not None for v in tid[: A.shape[0]]):
        steps = ", ".join("-" if v is None else f"{float(v):.1f}" for v in tid[: A.shape[0]])
        lines.append(f"- task-id accuracy after each task: {steps}")
    knn = run.get("retention_knn")
    if isinstance(knn, list) and knn:  # the pre-training domain's weighted k-NN: before training, then per task
        after = ", ".join(f"{float(v):.1f}" for v in knn[1 : A.shape[0] + 1]) or "-"
        lines.append(f"- retention k-NN accuracy: before training {float(knn[0]):.1f}; after each task: {after}")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: PathLike | Iterable[PathLike], out_dir: PathLike) -> Path:
    """Writes ``report.md``, ``summary.csv`` and ``accuracy.png`` for the given runs into ``out_dir``.

    Args:
        run_dirs: Run directories holding ``metrics.json`` (a single path is accepted too).
        out_dir: Output directory (created if needed).

    Returns:
        Path of the written ``report.md`` (summary table, the plot, and each run's accuracy matrix).
    """
    dirs = _as_run_dirs(run_dirs)
    if not dirs:
        raise ValueError("write_report needs at least one run directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(dirs)
    to_csv(rows, out / CSV_FILE)
    plot_runs(dirs, out / PLOT_FILE)
    parts = [
        "# retain report",
        "",
        "Metrics are recomputed from each run's accuracy matrix (percent; forgetting = max_upto definition, "
        "task-id acc = at the last finished task). See docs/metrics.md for the formulas.",
        "",
        to_markdown(rows),
        f"![accuracy]({PLOT_FILE})",
        "",
        "## Runs",
        "",
    ]
    parts += [_run_section(d) for d in dirs]
    report = out / REPORT_FILE
    report.write_text("\n".join(parts), encoding="utf-8")
    return report
