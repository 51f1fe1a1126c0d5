"""Runs grouped over seeds: runs whose resolved configs differ only in ``seed`` (and ``name`` / ``out_dir``) form
one group, reported as the mean, the sample standard deviation (ddof=1) and n of every metric.

Where the paths come from: a run directory (``metrics.json``), a sweep folder (``sweep.json``, written by
``retain sweep``) or a folder of run directories (``runs/``).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from retain.config import load_yaml
from retain.report.tables import (
    COLUMNS,
    METRICS_FILE,
    MISSING,
    NUMERIC_KEYS,
    PathLike,
    Stat,
    accuracy_matrix,
    as_run_dirs,
    load_run,
    summary_rows,
    table_keys,
)
from retain.runindex import CONFIG_FILE, SWEEP_FILE, read_index

__all__ = ["GROUP_COLUMNS", "IGNORED_KEYS", "Group", "expand_run_dirs", "group_rows", "group_runs", "run_config"]

IGNORED_KEYS = ("seed", "name", "out_dir")  # a group's runs may differ in these
SHARED_KEYS = ("storage_rule",)  # text columns every run of a group has alike (its config fixes them)
GROUP_COLUMNS: dict[str, str] = {"group": "group", "n": "n", "seeds": "seeds", "tasks": "tasks"}
GROUP_COLUMNS |= {k: v for k, v in COLUMNS.items() if k in NUMERIC_KEYS or k in SHARED_KEYS}
_MAX_LABEL_KEYS = 3


@dataclass
class Group:
    """Runs of one config over seeds, with their summary rows and accuracy matrices, in the order given."""

    label: str
    runs: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    matrices: list[np.ndarray | None] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    config: dict[str, Any] | None = None  # resolved config less IGNORED_KEYS; None: the run has no config.yaml

    @property
    def n(self) -> int:
        return len(self.runs)


def expand_run_dirs(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The run directories named by ``paths``: a run, a sweep folder (its runs that have metrics, in index order)
    or a folder of runs and sweeps (in name order); each run once.

    Raises:
        FileNotFoundError: A path is none of these (the message names it).
    """
    out: list[Path] = []
    for path in as_run_dirs(paths):
        if path.is_file() and path.name == METRICS_FILE:
            path = path.parent
        if (path / METRICS_FILE).is_file():
            out.append(path)
        elif (path / SWEEP_FILE).is_file():
            out += _sweep_runs(path)
        elif path.is_dir() and (below := _runs_below(path)):
            out += below
        else:
            raise FileNotFoundError(f"{path}: no {METRICS_FILE} or {SWEEP_FILE} here, nor runs below it (a run "
                                    f"writes {METRICS_FILE} after its first task)")  # fmt: skip
    return list(dict.fromkeys(out))


def _runs_below(folder: Path) -> list[Path]:
    out: list[Path] = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (d / METRICS_FILE).is_file():
            out.append(d)
        elif (d / SWEEP_FILE).is_file():
            out += _sweep_runs(d, required=False)
    return out


def _sweep_runs(sweep_dir: Path, required: bool = True) -> list[Path]:
    names = [r["name"] for r in read_index(sweep_dir)["runs"]]
    have = [sweep_dir / n for n in names if (sweep_dir / n / METRICS_FILE).is_file()]
    if len(have) < len(names):
        warnings.warn(f"{sweep_dir}: {len(names) - len(have)} of {len(names)} runs have no metrics yet and are "
                      "left out", stacklevel=3)  # fmt: skip
    if not have and required:
        raise FileNotFoundError(f"{sweep_dir}: no run of this sweep has finished a task yet")
    return have


def run_config(run_dir: PathLike) -> dict[str, Any] | None:
    """A run's resolved ``config.yaml`` less :data:`IGNORED_KEYS`; None when it is absent or unreadable."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        config = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return {k: v for k, v in config.items() if k not in IGNORED_KEYS}


def group_runs(run_dirs: PathLike | Iterable[PathLike], rows: Sequence[dict[str, Any]] | None = None) -> list[Group]:
    """Groups runs whose resolved configs differ only in :data:`IGNORED_KEYS` and that finished as many tasks.

    A run without a ``config.yaml`` is a group of its own. Groups come in the order of their first run and are
    labelled by method and the config keys in which groups of one method differ (``lwf (train.lr=0.1)``).

    Args:
        run_dirs: Run directories.
        rows: Their :func:`~retain.report.tables.summary_rows`, if already computed.
    """
    dirs = as_run_dirs(run_dirs)
    rows = summary_rows(dirs) if rows is None else rows
    groups: dict[str, Group] = {}
    for run_dir, row in zip(dirs, rows, strict=True):
        run, config = load_run(run_dir), run_config(run_dir)
        A = accuracy_matrix(run)
        k = 0 if A is None else A.shape[0]
        key = str(run_dir.resolve()) if config is None else json.dumps([config, k], sort_keys=True, default=str)
        group = groups.setdefault(key, Group(label=row["run"], config=config))
        group.runs.append(run_dir)
        group.rows.append(row)
        group.matrices.append(A)
        group.seeds.append(run.get("seed", MISSING))
    out = list(groups.values())
    _set_labels(out)
    return out


def group_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group (keyed like :data:`GROUP_COLUMNS`): label, n, seeds, tasks and a :class:`Stat` of every
    number of the runs' summary rows (``"-"`` when a run lacks it)."""
    out = []
    for g in groups:
        row: dict[str, Any] = {
            "group": g.label,
            "n": g.n,
            "seeds": ", ".join(map(str, g.seeds)),
            "tasks": g.rows[0]["tasks"],
        } | {k: g.rows[0].get(k, MISSING) for k in SHARED_KEYS}
        for key in table_keys(g.rows):
            if key in NUMERIC_KEYS:
                row[key] = _stat([r.get(key, MISSING) for r in g.rows])
        out.append(row)
    return out


def _stat(values: list[Any]) -> Stat | str:
    """Mean, sample std (ddof=1) and n; ``"-"`` unless every run has a finite number."""
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        return MISSING
    x = np.asarray(values, dtype=np.float64)  # (n,)
    return Stat(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


# ----------------------------------------------------------------------------------------------- labels


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _varying_keys(flats: list[dict[str, Any]]) -> list[str]:
    """Dotted keys whose values differ between configs (a key one config lacks differs)."""
    keys = dict.fromkeys(k for f in flats for k in f)
    return [k for k in keys if len({json.dumps(f.get(k, MISSING), sort_keys=True, default=str) for f in flats}) > 1]


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _set_labels(groups: list[Group]) -> None:
    """The method's name, plus the config keys in which groups of that method differ (up to three, else the first
    run's name); a run without a config keeps its name."""
    by_method: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        if g.config is not None:
            by_method[g.rows[0]["method"]].append(g)
    for method, same in by_method.items():
        flats = [_flatten(g.config or {}) for g in same]
        varying = _varying_keys(flats)
        for g, flat in zip(same, flats, strict=True):
            extra = [f"{k}={_show(flat.get(k, MISSING))}" for k in varying]
            g.label = method + (f" ({', '.join(extra)})" if extra else "")
            if len(extra) > _MAX_LABEL_KEYS:
                g.label = f"{method} [{g.rows[0]['run']}]"
    counts = Counter(g.label for g in groups)
    for g in groups:  # same config, another number of finished tasks
        if counts[g.label] > 1:
            g.label += f" [{g.rows[0]['run']}]"
