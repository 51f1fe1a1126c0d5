"""The run directory: resolved config, run state, per-task checkpoints and metrics, each written atomically.

``runs/<name>/{config.yaml, scenario.json, init_sha256.json, run_state.json, metrics.json,
checkpoints/task_NNN.safetensors, tb/}``

A per-task checkpoint leaves out the tensors still equal (bitwise) to the model the run started from
(``init_sha256.json``); its safetensors metadata (``LEFT_OUT``) names them with their sha256, and ``load_checkpoint``
takes them from the rebuilt method. Per-task checkpoints are pruned to ``run.keep_checkpoints`` (default: the newest,
the one ``--resume`` and ``retain export`` read) only after the run state naming the newest is on disk (file and
directory synced), so a crash at any point leaves the checkpoint the run state names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from retain import distributed, metrics
from retain.config import RunConfig, checkpoints_kept, config_to_dict, load_yaml, save_config
from retain.data.scenarios import Scenario
from retain.engine.context import RunError
from retain.engine.evaluation import Evaluation, primary_view

__all__ = ["RunState", "RunDir", "STATE_FILE", "METRICS_FILE", "SCENARIO_FILE", "INIT_FILE", "FREE_KEYS",
           "LEFT_OUT", "unchanged", "tensor_sha256", "state_sha256", "combined_sha256", "fsync_path"]  # fmt: skip

STATE_FILE = "run_state.json"
METRICS_FILE = "metrics.json"
# keys that may differ on --resume: they change how a run is executed, not what it computes
FREE_KEYS = {"train.progress", "train.tensorboard", "train.num_workers", "train.persistent_workers",
             "train.prefetch_factor", "train.device", "train.threads", "run.checkpoint_every",
             "run.export_each_task", "run.keep_checkpoints", "train.sync_every"}  # fmt: skip
SCENARIO_FILE = "scenario.json"
INIT_FILE = "init_sha256.json"  # sha256 of every tensor of the model the run started from
LEFT_OUT = "left_out_sha256"  # a per-task checkpoint's metadata: {name: sha256} of the tensors equal to INIT_FILE's


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # (the buffer itself: no copy)
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``tensor_sha256`` of each tensor, by name."""
    return {k: tensor_sha256(v) for k, v in state.items()}


def combined_sha256(digests: dict[str, str]) -> str:
    """One sha256 over named tensor digests, in name order."""
    return hashlib.sha256("".join(f"{k}:{digests[k]}\n" for k in sorted(digests)).encode()).hexdigest()


@dataclass
class RunState:
    """What the run has finished so far: one row per finished task in every list."""

    protocol: str
    finished_tasks: int = 0
    matrices: dict[str, list[list[float]]] = field(default_factory=dict)  # view -> rows
    task_ids: list[float | None] = field(default_factory=list)
    task_id_counts: list[list[list[int]] | None] = field(default_factory=list)  # per task: (t + 1, T) counts
    method_records: list[dict[str, Any] | None] = field(default_factory=list)  # per task: ``Method.task_record``
    retention: list[float] = field(default_factory=list)  # before training, then after each task
    task_time_s: list[float] = field(default_factory=list)
    eval_time_s: list[float] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)
    bytes_per_task: list[int] = field(default_factory=list)
    checkpoint: str | None = None
    step: int = 0  # optimiser steps so far (TensorBoard continues from here on resume)
    processes: int = 1  # processes the run last ran on (``retain.distributed``)

    @property
    def rows(self) -> list[list[float]]:
        return self.matrices.get(primary_view(self.protocol), [])

    def record_task(self, ev: Evaluation, seconds: float, n_trained: int, n_bytes: int,
                    method_record: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.finished_tasks += 1
        for view, accs in ev.accuracy.items():
            self.matrices.setdefault(view, []).append(accs)
        self.task_ids.append(ev.task_id)
        self.task_id_counts.append(ev.task_id_counts)
        self.method_records.append(method_record)
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
        state = cls(**{k: v for k, v in data.items() if k in known} | {"protocol": protocol})
        for per_task in (state.task_id_counts, state.method_records):  # a state written before these lists existed
            per_task[:0] = [None] * (state.finished_tasks - len(per_task))
        return state


class RunDir:
    """Reads and writes one run's directory; every file is replaced atomically (write to a temp file, rename).
    Under several processes only rank 0 writes; the others read. ``keep``: how many per-task checkpoints
    ``save_state`` leaves (``retain.config.checkpoints_kept``; None: all, the default for a reader)."""

    def __init__(self, path: str | Path, keep: int | None = None) -> None:
        self.path = Path(path)
        self.main = distributed.is_main()
        self.keep = keep
        self._initial: dict[str, str] | None = None  # ``initial()``

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool) -> RunDir:
        """The directory of ``cfg``'s run; refuses to overwrite a finished run, or to resume another config."""
        out = cls(Path(cfg.out_dir) / cfg.name, checkpoints_kept(cfg.run.keep_checkpoints))
        if (out.path / STATE_FILE).exists() and not resume:
            raise RunError(f"run directory {out.path} already holds a run; continue it with --resume, or pick "
                           "another name=NEW_NAME")  # fmt: skip
        if resume and (out.path / "config.yaml").exists():
            try:
                saved = load_yaml((out.path / "config.yaml").read_text())
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", e)
                raise RunError(f"--resume: {out.path / 'config.yaml'} is not readable YAML ({problem}); start a new "
                               "run with another name=...") from None  # fmt: skip
            _check_same(saved, config_to_dict(cfg), defaults=config_to_dict(RunConfig(method=type(cfg.method)())))
        out.path.mkdir(parents=True, exist_ok=True)
        return out

    def save_config(self, cfg: RunConfig) -> None:
        if not self.main:
            return
        tmp = self.path / "config.yaml.tmp"
        with _writing(tmp, self.path / "config.yaml"):
            save_config(cfg, tmp)
            os.replace(tmp, self.path / "config.yaml")

    def check_initial(self, digests: dict[str, str], resume: bool) -> None:
        """Record the sha256 of each tensor of the model the run starts from; on resume, refuse a model that is not
        that one (another weights file, another version of the code)."""
        path = self.path / INIT_FILE
        if resume and path.exists():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in set(saved) | set(digests) if saved.get(k) != digests.get(k))
            if changed:
                raise RunError(f"--resume: the model built now is not the one this run started from ({changed[0]} "
                               "differs: another weights file or version of retain?); start a new run with another "
                               "name=...")  # fmt: skip
            self._initial = saved
            return
        self.write_json(INIT_FILE, digests)
        self._initial = digests

    def initial(self) -> dict[str, str]:
        """The run's ``init_sha256.json`` ({} where it has none: its checkpoints keep every tensor)."""
        if self._initial is None:
            path = self.path / INIT_FILE
            self._initial = json.loads(path.read_text()) if path.exists() else {}
        return self._initial

    def save_scenario(self, scenario: Scenario) -> None:
        """``scenario.json``: protocol, class order, class names and task sizes (what an export needs)."""
        self.write_json(SCENARIO_FILE, {"protocol": scenario.protocol, "class_order": scenario.class_order,
                                        "class_names": scenario.class_names,
                                        "classes_per_task": scenario.classes_per_task})  # fmt: skip

    def load_state(self, protocol: str) -> RunState:
        path = self.path / STATE_FILE
        return RunState.from_dict(json.loads(path.read_text()), protocol) if path.exists() else RunState(protocol)

    def save_state(self, state: RunState) -> None:
        """Write ``run_state.json``, then prune the per-task checkpoints it no longer needs (``keep``)."""
        data = asdict(state)
        data.pop("protocol")
        self.write_json(STATE_FILE, data)
        if state.checkpoint is not None:
            self.prune_checkpoints(state.checkpoint)

    def prune_checkpoints(self, newest: str) -> list[str]:
        """Delete the per-task checkpoints older than the ``keep`` newest up to ``newest`` (the one the saved run
        state names), those after it (a task whose save the run state never named) and temporary files a killed save
        left; returns the names deleted. Call only once the run state naming ``newest`` is written."""
        folder = self.path / "checkpoints"
        if not self.main or not (self.path / newest).is_file():  # never prune around a missing checkpoint
            return []
        last = _task_index(Path(newest).name)
        stale = list(folder.glob("task_*.safetensors.tmp"))
        if self.keep is not None and last is not None:
            kept = range(last - self.keep + 1, last + 1)
            stale += [p for p in folder.glob("task_*.safetensors") if _task_index(p.name) not in kept]
        if stale:  # the run state and the newest checkpoint reach the disk before anything older goes
            fsync_path(self.path / newest)
            fsync_path(folder)
            fsync_path(self.path)
        for p in stale:
            p.unlink(missing_ok=True)
        return sorted(p.name for p in stale)

    def save_checkpoint(self, tensors: dict[str, torch.Tensor], task: int, method: str) -> str:
        """``checkpoints/task_NNN.safetensors`` of ``tensors`` less those equal to the model the run started from
        (named with their sha256 in its ``LEFT_OUT`` metadata); returns its path relative to the run directory."""
        rel = f"checkpoints/task_{task:03d}.safetensors"
        if not self.main:
            return rel
        (self.path / "checkpoints").mkdir(exist_ok=True)
        left_out = unchanged(tensors, self.initial())
        state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items() if k not in left_out}
        meta = {"task": str(task), "method": method, LEFT_OUT: json.dumps(left_out, sort_keys=True)}
        tmp = self.path / f"{rel}.tmp"
        with _writing(tmp, self.path / rel):
            save_file(state, str(tmp), metadata=meta)
            fsync_path(tmp)
            os.replace(tmp, self.path / rel)
        return rel

    def load_checkpoint(self, rel: str, device: torch.device | str = "cpu",
                        fill: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The tensors of a per-task checkpoint. Those it left out are taken from ``fill`` (the rebuilt method's model
        state and ``checkpoint_state()``, after ``setup``) once their sha256 is checked; a checkpoint written before
        tensors were left out holds them all."""
        path = self.path / rel
        if not path.exists():
            raise RunError(f"--resume: checkpoint {path} is missing; start a new run with another name=...")
        state = load_file(str(path), device=str(device))
        with safe_open(str(path), "pt") as f:
            left_out = json.loads((f.metadata() or {}).get(LEFT_OUT, "{}"))
        for name, digest in sorted(left_out.items()):
            t = (fill or {}).get(name)
            if t is None or tensor_sha256(t) != digest:
                raise RunError(f"{path} left out {name} as equal to the model the run started from, but the model "
                               f"rebuilt now {'lacks it' if t is None else 'differs'}; rebuild it from the run's "
                               "weights file and retain version (model.weights=FILE, or --weights FILE)")  # fmt: skip
            state[name] = t.detach().to(device)
        return state

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if not self.main:
            return
        path = self.path / name
        tmp = path.with_suffix(".tmp")
        with _writing(tmp, path):
            tmp.write_text(json.dumps(data, indent=1))
            fsync_path(tmp)
            os.replace(tmp, path)  # an interrupted write never corrupts finished results

    def write_metrics(self, record: dict[str, Any]) -> None:
        self.write_json(METRICS_FILE, record)


def unchanged(tensors: Mapping[str, torch.Tensor], initial: dict[str, str]) -> dict[str, str]:
    """{name: sha256} of the tensors of ``tensors`` whose sha256 is ``initial``'s (the run's ``init_sha256.json``); a
    name ``initial`` lacks (added by ``setup``, or not the model's) is never among them."""
    digests = {k: tensor_sha256(v) for k, v in tensors.items() if k in initial}
    return {k: d for k, d in digests.items() if d == initial[k]}


def _task_index(name: str) -> int | None:
    """N of ``task_NNN.safetensors``, else None."""
    stem = name.removesuffix(".safetensors")
    return int(stem[5:]) if stem.startswith("task_") and stem[5:].isdigit() else None


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _writing(tmp: Path, dest: Path) -> Iterator[None]:
    """Around writing ``tmp`` then renaming it to ``dest``: a full disk (or any OS error) is one RunError; the temp
    file goes."""
    try:
        yield
    except OSError as e:
        raise RunError(f"could not write {dest}: {e.strerror or e}; what was saved before is kept: "
                       "free disk space, then continue with --resume") from None  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)


def _check_same(saved: dict, now: dict, prefix: str = "", defaults: dict | None = None) -> None:
    """Refuse to resume under a config that computes something else; a key the saved config lacks (written by an
    older retain) is accepted at its default value."""
    for key in sorted(set(saved) | set(now)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        default = (defaults or {}).get(key)
        old_section = isinstance(a, dict) or (key not in saved and isinstance(b, dict))
        new_section = isinstance(b, dict) or (key not in now and isinstance(a, dict))
        if old_section and new_section:  # a whole section may be missing on either side
            _check_same(a or {}, b or {}, path + ".", default if isinstance(default, dict) else None)
        elif path in FREE_KEYS or a == b:
            continue
        elif key not in saved and defaults is not None and key in defaults:  # a key added since the run started
            if b != default:
                raise RunError(
                    f"--resume: the saved config.yaml (an older retain) has no key {path}, which is now "
                    f"{b!r}; resume with {path}={default!r} or start a new run with another name=..."
                )
        elif key not in now:
            raise RunError(f"--resume: the saved config.yaml has {path}={a!r}, which this config does not have "
                           "(another version of retain?); start a new run with another name=...")  # fmt: skip
        else:
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
        "task_id_counts": state.task_id_counts if any(v is not None for v in state.task_id_counts) else None,
        "method_records": state.method_records if any(v is not None for v in state.method_records) else None,
        "task_time_s": state.task_time_s, "eval_time_s": state.eval_time_s,
        "trainable_params": state.trainable_params, "bytes_per_task": state.bytes_per_task,
        "storage_rule": metrics.storage_rule(state.protocol), "total_time_s": sum(state.task_time_s),
        "retention_knn": state.retention or None,
        "distributed": distributed.batch_plan(cfg.train, state.processes),
    }  # fmt: skip
    if rows:
        tid = [v for v in state.task_ids if v is not None] or None
        by_view = {view: metrics.summarize(_finished_square(m), tid) for view, m in state.matrices.items()}
        record["metrics"] = by_view[primary_view(state.protocol)]
        record["metrics_by_view"] = by_view
    return record


def _finished_square(rows: list[list[float]]) -> list[list[float]]:
    return [r[: len(rows)] + [float("nan")] * (len(rows) - len(r)) for r in rows]
