"""The exported model: one safetensors file holding what the tasks added to the pre-trained backbone, the class names
and order, and the backbone (tag and sha256) it runs on. ``export_run`` writes it from a run directory; ``load``
reads it back as a :class:`Predictor` (``retain export`` / ``retain predict``); a run with ``run.export_each_task``
writes it after every task (``write_artefact``). Nothing is unpickled. It is the only artefact format."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from retain.config import RunConfig, config_to_dict, from_dict, load_yaml
from retain.data import IMAGE_EXTENSIONS, ImageDataset
from retain.data.scenarios import Scenario, Task
from retain.engine.build import build_transforms, probe_backbone, rebuild_method
from retain.engine.context import RunError
from retain.engine.rundir import INIT_FILE, SCENARIO_FILE, RunDir, combined_sha256, state_sha256, unchanged
from retain.methods.base import Method
from retain.models import data_config
from retain.models.backbones import file_sha256, weights_file
from retain.models.continual import head_prefix

__all__ = ["FORMAT", "ARTEFACT_FILE", "ImagePrediction", "Predictor", "export_run", "restore_run", "write_artefact",
           "self_contained", "load", "image_files"]  # fmt: skip

FORMAT = "retain-artefact-v1"
ARTEFACT_FILE = "artefact.safetensors"  # what ``run.export_each_task`` writes in the run directory


def _scenario(info: dict[str, Any]) -> Scenario:
    """The run's scenario without its data: task sizes, class order and names."""
    tasks, offset = [], 0
    for t, n in enumerate(info["classes_per_task"]):
        tasks.append(Task(t, info["class_order"][offset : offset + n], offset, None, None, None))
        offset += n
    return Scenario(info["protocol"], tasks, info["class_order"], info["class_names"])


def _rebuild(cfg: RunConfig, scenario: Scenario) -> tuple[Method, dict[str, str]]:
    """The method as the run built it before training, and the sha256 of each of its model's tensors."""
    method = rebuild_method(cfg, scenario)
    method.setup()
    return method, state_sha256(method.model.state_dict())


def _ready(method: Method, scenario: Scenario, n_tasks: int) -> None:
    """Make the method predict as it did after its ``n_tasks``-th task."""
    method.model.set_seen(n_tasks)
    method.resume(scenario.tasks[n_tasks - 1])


def _read_run(run_dir: Path) -> tuple[RunConfig, dict[str, Any], RunDir]:
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.yaml); pass runs/<name>")
    for name in (SCENARIO_FILE, INIT_FILE):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir} has no {name} (written by an older retain); run it again to export it")
    cfg = from_dict(RunConfig, load_yaml((run_dir / "config.yaml").read_text()))
    return cfg, json.loads((run_dir / SCENARIO_FILE).read_text()), RunDir(run_dir)


def _check_rebuilt(digests: dict[str, str], recorded: dict[str, str], run_dir: str | Path) -> None:
    changed = sorted(k for k in set(digests) | set(recorded) if digests.get(k) != recorded.get(k))
    if changed:
        raise RunError(f"cannot rebuild the model {run_dir} started from ({changed[0]} differs: another weights file "
                       "or version of retain?); pass the run's backbone file with --weights FILE")  # fmt: skip


def export_run(run_dir: str | Path, out: str | Path, weights: str | Path | None = None) -> dict[str, str]:
    """Write the artefact of the run in ``run_dir`` (its finished tasks) to ``out``; returns its metadata.

    ``weights`` replaces the run's ``model.weights`` (the backbone file on this machine). What is kept:
    ``write_artefact``.
    """
    method, cfg, info, n, recorded = restore_run(run_dir, weights)
    return write_artefact(method, cfg, info, n, recorded, out)


def restore_run(run_dir: str | Path, weights: str | Path | None = None) -> tuple[Method, RunConfig, dict[str, Any],
                                                                                  int, dict[str, str]]:  # fmt: skip
    """The method of the run in ``run_dir`` as it predicted after its last finished task (on the CPU), its config,
    ``scenario.json``, the number of finished tasks and ``init_sha256.json`` (what ``export_run`` and
    ``retain.export_timm`` write from). ``weights`` replaces the run's ``model.weights``."""
    cfg, info, rundir = _read_run(Path(run_dir))
    state = rundir.load_state(info["protocol"])
    if state.finished_tasks == 0 or state.checkpoint is None:
        raise RunError(f"{run_dir} has no checkpoint of a finished task to export (checkpoint=false, or no task "
                       "finished yet)")  # fmt: skip
    if weights is not None:
        cfg.model.weights = str(weights)
    n, scenario = state.finished_tasks, _scenario(info)
    method, digests = _rebuild(cfg, scenario)
    recorded = json.loads((rundir.path / INIT_FILE).read_text())
    _check_rebuilt(digests, recorded, run_dir)
    fill = method.model.state_dict() | method.checkpoint_state()  # what the checkpoint left out, as rebuilt
    method.load_checkpoint_state(rundir.load_checkpoint(state.checkpoint, fill=fill))
    _ready(method, scenario, n)
    return method, cfg, info, n, recorded


def self_contained(meta: dict[str, str]) -> bool:
    """Whether the artefact with metadata ``meta`` holds the whole model (no backbone tensor outside it: its
    ``backbone_sha256`` is the digest of nothing)."""
    return meta.get("backbone_sha256") == combined_sha256({})


def write_artefact(method: Method, cfg: RunConfig, info: dict[str, Any], n: int, initial: dict[str, str],
                   out: str | Path) -> dict[str, str]:  # fmt: skip
    """Write the artefact of ``method`` after its ``n``-th task to ``out`` (atomically); returns its metadata.

    Kept: the tensors of ``Method.deployed_state()`` whose sha256 differs from ``initial`` (the run's
    ``init_sha256.json``: the model it started from): heads, LN rows and keys, BN snapshots and input means, LoRA
    matrices, inserted blocks; the whole backbone when it was fine-tuned. ``info``: the run's ``scenario.json``.
    """
    tensors = _added(method.deployed_state(), initial, n, len(info["classes_per_task"]))
    file = weights_file(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights)
    meta = {"format": FORMAT, "method": cfg.method.name, "backbone": cfg.model.backbone,
            "backbone_sha256": combined_sha256({k: v for k, v in initial.items() if k not in tensors}),
            "backbone_file_sha256": file_sha256(file) if file else "", "tasks_trained": str(n),
            "tensors_sha256": combined_sha256(state_sha256(tensors)), "config": json.dumps(config_to_dict(cfg)),
            "scenario": json.dumps(info)}  # fmt: skip
    _save_atomic(tensors, meta, Path(out))
    return meta


def _added(state: dict[str, torch.Tensor], initial: dict[str, str], n: int,
           n_tasks: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """The tensors of ``state`` whose sha256 differs from ``initial``'s, without the heads of tasks not trained."""
    untrained = tuple(head_prefix(t) for t in range(n, n_tasks))
    same = unchanged(state, initial)
    return {
        k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith(untrained) and k not in same
    }


def _save_atomic(tensors: dict[str, torch.Tensor], meta: dict[str, str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class ImagePrediction:
    """One image's prediction: label (position in the class order), class name, and the task routed to (methods
    that route, else None)."""

    file: str
    label: int
    name: str
    task: int | None = None


def image_files(items: Sequence[str | Path]) -> list[str]:
    """Image files named by ``items`` (files, or folders searched recursively, sorted)."""
    files: list[str] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {item}")
            files += map(str, found)
        elif item.is_file():
            files.append(str(item))
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    return files


class Predictor:
    """A loaded artefact: ``predict(files)`` gives class names; ``predict_tensor(x)`` labels of prepared images."""

    def __init__(self, cfg: RunConfig, scenario: Scenario, method: Method, n_tasks: int, device: str) -> None:
        self.cfg, self.scenario, self.method, self.n_tasks = cfg, scenario, method, n_tasks
        self.device = torch.device(device)
        method.to(self.device)
        self._deployed = ExitStack()  # the method stays as deployed for the predictor's life
        self._deployed.enter_context(method.deployed())
        method.model.eval()
        self.transform = build_transforms(cfg, data_config(probe_backbone(cfg)))[1]

    @property
    def class_names(self) -> list[str]:
        return self.scenario.class_names

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels (B,) of images ``x`` (B, 3, H, W) already transformed, and the task each was routed to (B,) when
        the method routes. ``task`` (task-incremental runs): predict among that task's classes, as ``taw``."""
        if task is not None and (self.scenario.protocol != "task_il" or not 0 <= task < self.n_tasks):
            raise ValueError(f"--task {task}: a task id applies to task-incremental runs, tasks 0..{self.n_tasks - 1}")
        amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            pred = self.method.predict(x.to(self.device), task)
        logits, routed = pred.logits.float(), pred.task_ids
        if task is None:
            labels = logits[:, : self.scenario.seen_classes(self.n_tasks - 1)].argmax(1)
        else:
            t = self.scenario.tasks[task]
            labels = logits[:, t.offset : t.offset + t.n_classes].argmax(1) + t.offset
        return labels.cpu(), None if routed is None else routed.cpu()

    def predict(self, images: Sequence[str | Path], task: int | None = None,
                batch_size: int | None = None) -> list[ImagePrediction]:  # fmt: skip
        """Predictions for image files (or folders of them), in order."""
        files = image_files(images)
        data = ImageDataset(np.zeros(len(files)), ["?"], paths=files, transform=self.transform)
        out: list[ImagePrediction] = []
        for x, _ in DataLoader(data, batch_size=batch_size or self.cfg.train.eval_batch_size):
            labels, routed = self.predict_tensor(x, task)
            for i, label in enumerate(labels.tolist()):
                t = None if routed is None else int(routed[i])
                out.append(ImagePrediction(files[len(out)], label, self.class_names[label], t))
        return out


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """An artefact's metadata and tensors, checked against their sha256."""
    if not path.is_file():
        raise FileNotFoundError(f"no artefact at {path}; write one with `retain export RUN_DIR -o FILE`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a retain artefact (format {meta.get('format')!r}, expected {FORMAT})")
    if combined_sha256(state_sha256(tensors)) != meta["tensors_sha256"]:
        raise ValueError(f"{path} is corrupt: its tensors do not match their sha256; export it again")
    return meta, tensors


def load(path: str | Path, weights: str | Path | None = None, device: str = "cpu") -> Predictor:
    """The artefact at ``path``, on the backbone it names (``weights``: its weights file on this machine)."""
    path = Path(path)
    meta, tensors = _read(path)
    cfg = from_dict(RunConfig, json.loads(meta["config"]))
    if weights is not None:
        cfg.model.weights = str(weights)
    scenario, n = _scenario(json.loads(meta["scenario"])), int(meta["tasks_trained"])
    method, digests = _rebuild(cfg, scenario)
    backbone_sha = combined_sha256({k: v for k, v in digests.items() if k not in tensors})
    if backbone_sha != meta["backbone_sha256"]:
        raise ValueError(f"the backbone {cfg.model.backbone} built here (sha256 {backbone_sha[:12]}) is not the one "
                         f"{path.name} was made on ({meta['backbone_sha256'][:12]}); pass its weights file with "
                         "--weights FILE")  # fmt: skip
    method.load_checkpoint_state(tensors)
    _ready(method, scenario, n)
    return Predictor(cfg, scenario, method, n, device)
