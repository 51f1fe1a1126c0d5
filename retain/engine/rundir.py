"""The run directory: resolved config, run state, per-task checkpoints and metrics, each written atomically.

``runs/<name>/{config.yaml, run_state.json, metrics.json, checkpoints/task_NNN.safetensors, tb/}``
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from retain import metrics
from retain.config import RunConfig, config_to_dict, save_config
from retain.engine.context import RunError
from retain.engine.evaluation import Evaluation, primary_view

__all__ = ["RunState", "RunDir", "STATE_FILE", "METRICS_FILE", "FREE_KEYS"]

STATE_FILE = "run_state.json"
METRICS_FILE = "metrics.json"
# keys that may differ on --resume: they change how a run is executed, not what it computes
FREE_KEYS = {"train.progress", "train.tensorboard", "train.num_workers", "train.device", "train.threads"}


@dataclass
class RunState:
    """What the run has finished so far: one row per finished task in every list."""

    protocol: str
    finished_tasks: int = 0
    matrices: dict[str, list[list[float]]] = field(default_factory=dict)  # view -> rows
    task_ids: list[float | None] = field(default_factory=list)
    retention: list[float] = field(default_factory=list)  # before training, then after each task
    task_time_s: list[float] = field(default_factory=list)
    eval_time_s: list[float] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)
    bytes_per_task: list[int] = field(default_factory=list)
    checkpoint: str | None = None
    step: int = 0  # optimiser steps so far (TensorBoard continues from here on resume)

    @property
    def rows(self) -> list[list[float]]:
        return self.matrices.get(primary_view(self.protocol), [])

    def record_task(self, ev: Evaluation, seconds: float, n_trained: int, n_bytes: int) -> None:
        self.finished_tasks += 1
        for view, accs in ev.accuracy.items():
            self.matrices.setdefault(view, []).append(accs)
        self.task_ids.append(ev.task_id)
        if ev.retention is not None:
            self.retention.append(ev.retention)
        self.task_time_s.append(seconds)
        self.eval_time_s.append(ev.seconds)
        self.trainable_params.append(n_trained)
        self.bytes_per_task.append(n_bytes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], protocol: str) -> RunState:
        data = dict(data)
        if "rows" in data:  # written before named views existed: the rows are the primary view
            data.setdefault("matrices", {primary_view(protocol): data.pop("rows")})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known} | {"protocol": protocol})


class RunDir:
    """Reads and writes one run's directory; every file is replaced atomically (write to a temp file, rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool) -> RunDir:
        """The directory of ``cfg``'s run; refuses to overwrite a finished run, or to resume another config."""
        out = cls(Path(cfg.out_dir) / cfg.name)
        if (out.path / STATE_FILE).exists() and not resume:
            raise RunError(f"run directory {out.path} already holds a run; continue it with --resume, or pick "
                           "another name=NEW_NAME")  # fmt: skip
        if resume and (out.path / "config.yaml").exists():
            saved = yaml.safe_load((out.path / "config.yaml").read_text())
            _check_same(saved, config_to_dict(cfg))
        out.path.mkdir(parents=True, exist_ok=True)
        return out

    def save_config(self, cfg: RunConfig) -> None:
        tmp = self.path / "config.yaml.tmp"
        save_config(cfg, tmp)
        os.replace(tmp, self.path / "config.yaml")

    def load_state(self, protocol: str) -> RunState:
        path = self.path / STATE_FILE
        return RunState.from_dict(json.loads(path.read_text()), protocol) if path.exists() else RunState(protocol)

    def save_state(self, state: RunState) -> None:
        data = asdict(state)
        data.pop("protocol")
        self.write_json(STATE_FILE, data)

    def save_checkpoint(self, tensors: dict[str, torch.Tensor], task: int, method: str) -> str:
        """``checkpoints/task_NNN.safetensors`` of ``tensors``; returns its path relative to the run directory."""
        rel = f"checkpoints/task_{task:03d}.safetensors"
        (self.path / "checkpoints").mkdir(exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        tmp = self.path / f"{rel}.tmp"
        save_file(state, str(tmp), metadata={"task": str(task), "method": method})
        os.replace(tmp, self.path / rel)
        return rel

    def load_checkpoint(self, rel: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        path = self.path / rel
        if not path.exists():
            raise RunError(f"--resume: checkpoint {path} is missing; start a new run with another name=...")
        return load_file(str(path), device=str(device))

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        path = self.path / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # an interrupted write never corrupts finished results

    def write_metrics(self, record: dict[str, Any]) -> None:
        self.write_json(METRICS_FILE, record)


def _check_same(saved: dict, now: dict, prefix: str = "") -> None:
    for key in sorted(set(saved) | set(now)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_same(a, b, path + ".")
        elif a != b and path not in FREE_KEYS:
            raise RunError(f"--resume with a different config: {path} was {a!r}, now {b!r}; use the saved config")


def _square(rows: list[list[float]], n_tasks: int) -> list[list[float | None]]:
    return [row + [None] * (n_tasks - len(row)) for row in rows]


def metrics_record(cfg: RunConfig, class_order: list[int], n_tasks: int, state: RunState) -> dict[str, Any]:
    """``metrics.json``: every named accuracy matrix (``accuracy_matrix`` = the protocol's primary view), the
    metrics derived from each, task-id and retention accuracy, times, parameters and bytes per task."""
    rows = state.rows
    record = {
        "run": cfg.name, "method": cfg.method.name, "backbone": cfg.model.backbone, "dataset": cfg.data.name,
        "protocol": state.protocol, "seed": cfg.seed, "n_tasks": n_tasks, "finished_tasks": len(rows),
        "class_order": class_order, "primary_view": primary_view(state.protocol),
        "accuracy_matrix": _square(rows, n_tasks),
        "matrices": {view: _square(m, n_tasks) for view, m in state.matrices.items()},
        "task_id_accuracy": state.task_ids if any(v is not None for v in state.task_ids) else None,
        "task_time_s": state.task_time_s, "eval_time_s": state.eval_time_s,
        "trainable_params": state.trainable_params, "bytes_per_task": state.bytes_per_task,
        "total_time_s": sum(state.task_time_s), "retention_knn": state.retention or None,
    }  # fmt: skip
    if rows:
        tid = [v for v in state.task_ids if v is not None] or None
        by_view = {view: metrics.summarize(_finished_square(m), tid) for view, m in state.matrices.items()}
        record["metrics"] = by_view[primary_view(state.protocol)]
        record["metrics_by_view"] = by_view
    return record


def _finished_square(rows: list[list[float]]) -> list[list[float]]:
    return [r[: len(rows)] + [float("nan")] * (len(rows) - len(r)) for r in rows]
