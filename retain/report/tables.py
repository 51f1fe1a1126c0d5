"""Summary tables of finished (or running) runs, read from each run directory's ``metrics.json``.

Reports only read data: every metric in a summary row is recomputed from the stored accuracy matrix with
:mod:`retain.metrics`; the numbers the engine stored under ``"metrics"`` are not used.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from retain.metrics import summarize
from retain.runindex import METRICS_FILE

__all__ = [
    "COLUMNS",
    "METRICS_FILE",
    "MISSING",
    "NUMERIC_KEYS",
    "OPTIONAL_COLUMNS",
    "Stat",
    "TEXT_KEYS",
    "accuracy_matrix",
    "as_run_dirs",
    "column_header",
    "format_matrix",
    "format_value",
    "load_run",
    "summary_rows",
    "to_csv",
    "table_keys",
    "to_markdown",
    "to_text",
]

MISSING = "-"

# Row key -> column header used by ``to_markdown``.
COLUMNS: dict[str, str] = {
    "run": "run",
    "method": "method",
    "dataset": "dataset",
    "protocol": "protocol",
    "tasks": "tasks",
    "average_accuracy": "avg acc",
    "average_incremental_accuracy": "avg inc acc",
    "forgetting": "forgetting",
    "forgetting_max_before": "forgetting (FACIL)",
    "backward_transfer": "BWT",
    "task_id_accuracy": "task-id acc",
    "trainable_params": "trainable params",
    "bytes_per_task": "bytes/task",
    "storage_rule": "bytes rule",
    "total_time_s": "train time (s)",
    "test_time_s": "test time (s)",
}
# Columns that appear only when some run has them (task-IL runs: the task-agnostic view).
OPTIONAL_COLUMNS: dict[str, str] = {"tag_average_accuracy": "TAg acc", "tag_forgetting": "TAg forgetting"}
# Retention of the pre-training domain (weighted k-NN, "retention_knn"): before training and after the last task.
OPTIONAL_COLUMNS |= {"retention_before": "k-NN before", "retention_after": "k-NN after"}
_PERCENT_KEYS = (
    "retention_before",
    "retention_after",
    "tag_average_accuracy",
    "tag_forgetting",
    "average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "forgetting_max_before",
    "backward_transfer",
    "task_id_accuracy",
)
# The numbers of a row (averaged over a group of seeds); every other column is a label.
NUMERIC_KEYS = (*_PERCENT_KEYS, "trainable_params", "bytes_per_task", "total_time_s", "test_time_s")
TEXT_KEYS = ("run", "method", "dataset", "protocol", "storage_rule", "group", "seeds")  # left-aligned columns

PathLike = str | Path


def as_run_dirs(run_dirs: PathLike | Iterable[PathLike]) -> list[Path]:
    """One path or several, as a list of Paths."""
    if isinstance(run_dirs, (str, Path)):
        return [Path(run_dirs)]
    return [Path(d) for d in run_dirs]


def load_run(run_dir: PathLike) -> dict[str, Any]:
    """Reads a run's ``metrics.json``.

    Args:
        run_dir: Run directory (or the path of its ``metrics.json``).

    Returns:
        The parsed JSON dict; ``"run"`` defaults to the directory name when absent.

    Raises:
        FileNotFoundError: If ``metrics.json`` does not exist.
    """
    path = Path(run_dir)
    if path.is_dir() or path.suffix != ".json":
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} found at {path} (is this a run directory?)")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    data.setdefault("run", path.parent.name)
    return data


def accuracy_matrix(run: dict[str, Any]) -> np.ndarray | None:
    """Square ``k x k`` accuracy matrix of a loaded run (``k`` = finished tasks), or ``None`` if nothing finished.

    Rows are finished tasks; extra columns (a ``k x n_tasks`` matrix of an unfinished run) are dropped and ragged
    lower-triangular rows are padded with NaN.
    """
    raw = run.get("accuracy_matrix")
    if raw is None:
        return None
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in raw]
    k = len(rows)
    if k == 0:
        return None
    out = np.full((k, k), np.nan)
    for t, row in enumerate(rows):
        vals = [math.nan if v is None else float(v) for v in row[:k]]
        out[t, : len(vals)] = vals
    return out


def _finite(values: Any) -> list[float]:
    if not isinstance(values, (list, tuple)):
        return []
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summary_rows(run_dirs: PathLike | Iterable[PathLike]) -> list[dict[str, Any]]:
    """One summary row per run, with metrics recomputed from the accuracy matrix.

    Args:
        run_dirs: Run directories (a single path is accepted too).

    Returns:
        List of dicts keyed like :data:`COLUMNS`: ``run, method, dataset, protocol, tasks`` ("finished/total"),
        ``average_accuracy`` (final), ``average_incremental_accuracy``, ``forgetting`` (max_upto),
        ``forgetting_max_before`` (FACIL), ``backward_transfer``, ``task_id_accuracy`` (at the last finished step),
        ``trainable_params`` (max over tasks), ``bytes_per_task`` (mean), ``total_time_s`` (training, summed over
        tasks) and ``test_time_s`` (evaluation, summed); plus, where the run has them, the task-agnostic view of a
        task-IL run (``tag_*``) and the retention k-NN accuracy (``retention_before``, ``retention_after``).
        Missing values are ``"-"``.
    """
    rows = []
    for run_dir in as_run_dirs(run_dirs):
        run = load_run(run_dir)
        A = accuracy_matrix(run)
        k = 0 if A is None else A.shape[0]
        n_tasks = run.get("n_tasks", k)
        summary: dict[str, float] = {}
        if A is not None:
            try:
                summary = summarize(A)
            except ValueError as e:  # e.g. a missing evaluation in a used entry: report "-" rather than crash
                warnings.warn(f"{run_dir}: cannot compute metrics: {e}", stacklevel=2)

        tid = run.get("task_id_accuracy")
        tid_last: Any = MISSING
        if isinstance(tid, (list, tuple)) and k > 0 and len(tid) >= k and tid[k - 1] is not None:
            tid_last = float(tid[k - 1])

        params = _finite(run.get("trainable_params"))
        nbytes = _finite(run.get("bytes_per_task"))
        total_time = run.get("total_time_s")
        if total_time is None and _finite(run.get("task_time_s")):
            total_time = sum(_finite(run.get("task_time_s")))
        test_time = _finite(run.get("eval_time_s"))

        row = _view_columns(run, "tag", k) | _retention_columns(run, k)
        rows.append(
            row
            | {
                "run": str(run.get("run", MISSING)),
                "method": str(run.get("method", MISSING)),
                "dataset": str(run.get("dataset", MISSING)),
                "protocol": str(run.get("protocol", MISSING)),
                "tasks": f"{run.get('finished_tasks', k)}/{n_tasks}",
                "average_accuracy": summary.get("average_accuracy", MISSING),
                "average_incremental_accuracy": summary.get("average_incremental_accuracy", MISSING),
                "forgetting": summary.get("forgetting", MISSING),
                "forgetting_max_before": summary.get("forgetting_max_before", MISSING),
                "backward_transfer": summary.get("backward_transfer", MISSING),
                "task_id_accuracy": tid_last,
                "trainable_params": int(max(params)) if params else MISSING,
                "bytes_per_task": float(np.mean(nbytes)) if nbytes else MISSING,
                "storage_rule": str(run.get("storage_rule", MISSING)),
                "total_time_s": float(total_time) if total_time is not None else MISSING,
                "test_time_s": sum(test_time) if test_time else MISSING,
            }
        )
    return rows


def _view_columns(run: dict[str, Any], view: str, k: int) -> dict[str, Any]:
    """Final average accuracy and forgetting of another accuracy view (``metrics.json``'s ``matrices``)."""
    raw = (run.get("matrices") or {}).get(view)
    if not raw or k == 0 or run.get("primary_view") == view:
        return {}
    A = accuracy_matrix({"accuracy_matrix": raw, "finished_tasks": k})
    try:
        summary = summarize(A)
    except ValueError:
        return {}
    return {f"{view}_average_accuracy": summary["average_accuracy"], f"{view}_forgetting": summary["forgetting"]}


def _retention_columns(run: dict[str, Any], k: int) -> dict[str, Any]:
    """Retention k-NN accuracy before training and after the last finished task, when the run probed it."""
    values = run.get("retention_knn")
    if not isinstance(values, list) or not values:
        return {}
    after = values[min(k, len(values) - 1)] if k > 0 else None
    return {"retention_before": values[0], "retention_after": MISSING if after is None else after}


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable


class Stat(NamedTuple):
    """One metric over the runs of a group: mean, sample standard deviation (ddof=1; NaN for n=1) and n."""

    mean: float
    std: float
    n: int


def format_value(key: str, value: Any) -> str:
    """A table cell: one decimal for percentages, thousands separators, binary byte units, ``mean ± std``."""
    if value is None or value == MISSING:
        return MISSING
    if isinstance(value, Stat):
        mean = format_value(key, value.mean)
        return mean if value.n < 2 or not math.isfinite(value.std) else f"{mean} ± {format_value(key, value.std)}"
    if isinstance(value, float) and not math.isfinite(value):
        return MISSING
    if key in _PERCENT_KEYS:
        return f"{float(value):.1f}"
    if key == "trainable_params":
        return f"{round(float(value)):,}"
    if key == "bytes_per_task":
        return _format_bytes(float(value))
    if key in ("total_time_s", "test_time_s"):
        return f"{float(value):.1f}"
    return str(value)


def _format_cell(key: str, value: Any) -> str:
    return format_value(key, value).replace("|", "\\|")


def table_keys(rows: Sequence[dict[str, Any]], columns: dict[str, str] | None = None) -> list[str]:
    """The columns of a table of ``rows``: every key of ``columns`` (default :data:`COLUMNS`), then the optional
    ones some row has, in first-seen order."""
    columns = COLUMNS if columns is None else columns
    return list(columns) + list(dict.fromkeys(k for r in rows for k in r if k not in columns))


def column_header(key: str, columns: dict[str, str]) -> str:
    """A row key's column header: from ``columns``, else :data:`OPTIONAL_COLUMNS`, else the key itself."""
    return columns.get(key, OPTIONAL_COLUMNS.get(key, key))


def to_markdown(rows: Sequence[dict[str, Any]], columns: dict[str, str] | None = None) -> str:
    """Renders summary rows as a GitHub Markdown table.

    Percentages get one decimal, parameter counts thousands separators, bytes binary units (KiB, MiB); a
    :class:`Stat` prints as ``mean ± std``. ``columns``: key -> header (default :data:`COLUMNS`).
    """
    columns = COLUMNS if columns is None else columns
    keys = table_keys(rows, columns)
    header = "| " + " | ".join(column_header(k, columns) for k in keys) + " |"
    align = "|" + "|".join(":---" if k in TEXT_KEYS else "---:" for k in keys) + "|"
    lines = [header, align]
    for r in rows:
        lines.append("| " + " | ".join(_format_cell(k, r.get(k, MISSING)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def to_text(rows: Sequence[dict[str, Any]], columns: dict[str, str] | None = None) -> str:
    """The table of :func:`to_markdown` as aligned plain text for the terminal (text left, numbers right)."""
    columns = COLUMNS if columns is None else columns
    keys = table_keys(rows, columns)
    table = [[column_header(k, columns) for k in keys]]
    table += [[format_value(k, r.get(k, MISSING)) for k in keys] for r in rows]
    widths = [max(len(line[j]) for line in table) for j in range(len(keys))]

    def render(cells: list[str]) -> str:
        padded = [c.ljust(w) if k in TEXT_KEYS else c.rjust(w) for k, c, w in zip(keys, cells, widths, strict=True)]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(table[0]), rule] + [render(line) for line in table[1:]]) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], path: PathLike, columns: dict[str, str] | None = None) -> Path:
    """Writes summary rows (full precision, row keys as header) to a CSV file and returns its path.

    A :class:`Stat` cell becomes two columns: ``<key>`` (the mean) and ``<key>_std``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [_flat_stats(r) for r in rows]
    keys = table_keys(flat, columns)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval=MISSING)
        writer.writeheader()
        for r in flat:
            writer.writerow(r)
    return path


def _flat_stats(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, Stat):
            out |= {k: v.mean, f"{k}_std": v.std}
        else:
            out[k] = v
    return out


def format_matrix(A: Any, decimals: int = 1) -> str:
    """Aligned plain-text table of an accuracy matrix for the terminal.

    Rows are "after task t", columns "task i"; unused (``i > t``) or missing entries print as ``"-"``.

    Args:
        A: Accuracy matrix (numpy array, tensor, nested list with ``None``); may be ``k x n`` for unfinished runs.
        decimals: Decimals per entry.
    """
    if hasattr(A, "detach"):
        A = A.detach().cpu().double().numpy()
    if isinstance(A, np.ndarray):
        A = A.tolist()
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in (A or [])]
    if not rows:
        return "(empty accuracy matrix)"
    n_cols = max(len(rows), max(len(r) for r in rows))
    cells = []
    for t, row in enumerate(rows):
        line = []
        for i in range(n_cols):
            v = row[i] if i < len(row) else None
            ok = i <= t and v is not None and math.isfinite(float(v))
            line.append(f"{float(v):.{decimals}f}" if ok else MISSING)
        cells.append(line)
    corner = "after \\ task"
    row_labels = [f"task {t}" for t in range(len(rows))]
    col_labels = [str(i) for i in range(n_cols)]
    w0 = max(len(corner), *(len(s) for s in row_labels))
    w = max(len(s) for s in col_labels + [c for line in cells for c in line])
    out = [corner.ljust(w0) + "".join("  " + s.rjust(w) for s in col_labels)]
    for label, line in zip(row_labels, cells, strict=True):
        out.append(label.ljust(w0) + "".join("  " + c.rjust(w) for c in line))
    return "\n".join(out)
