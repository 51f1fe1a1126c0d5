"""The file names of a run folder and the sweep index (``sweep.json``), shared by :mod:`retain.sweep` and reports.

Standard library only, so that sweeps and reports load no torch. The index holds the command's preset, its fixed
overrides (``fixed``), its swept keys and values (``grid``) and one entry per run (``runs``: :class:`SweepRun`).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "STATE_FILE",
    "STATUSES",
    "SWEEP_FILE",
    "SweepRun",
    "read_index",
    "write_index",
]

CONFIG_FILE = "config.yaml"  # a run's resolved config
METRICS_FILE = "metrics.json"  # a run's accuracy matrices, written after each task
STATE_FILE = "run_state.json"  # a started run's progress
SWEEP_FILE = "sweep.json"  # a sweep folder's index
STATUSES = ("pending", "submitted", "running", "interrupted", "failed", "finished")  # submitted: queued (a launcher)


@dataclass
class SweepRun:
    """One combination: its swept ``key=value`` overrides, its run name and where it stands."""

    name: str
    overrides: list[str]
    status: str = "pending"
    error: str | None = None
    job_id: str | None = None  # the launcher's job id (``--launcher``), absent in indexes written before
    launcher: str | None = None  # local | slurm: where job_id is known

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> SweepRun:
        """An index entry; keys an older or newer retain wrote that this one does not know are left out."""
        return cls(entry["name"], list(entry.get("overrides", [])), entry.get("status", "pending"), entry.get("error"),
                   entry.get("job_id"), entry.get("launcher"))  # fmt: skip


def read_index(sweep_dir: str | Path) -> dict[str, Any]:
    """A sweep folder's ``sweep.json``; ValueError naming the file if it is not a sweep index."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not readable JSON ({e.msg}); remove it to start the sweep's index anew") from None
    runs = index.get("runs") if isinstance(index, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in runs):
        raise ValueError(f"{path} is not a sweep index (no list of runs); remove it to start the index anew")
    return index


def write_index(sweep_dir: Path, index: dict[str, Any]) -> None:
    """``sweep_dir/sweep.json`` holding ``index``, replaced atomically."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f"{SWEEP_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"  # one per writer
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, sweep_dir / SWEEP_FILE)
