"""The one training loop. ``run(cfg)`` builds data, model and method, then for every task: ``fit_task`` (the
method's stages, each a fresh optimiser), ``evaluate`` on all tasks seen so far, and a checkpoint of the
method's state so ``resume=True`` continues after the last finished task. Only this file steps an optimiser.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from retain import metrics
from retain.config import ConfigError, RunConfig, TrainConfig, config_to_dict, save_config
from retain.data import build_transform, create_dataset
from retain.data.scenarios import Scenario, Task, create_scenario
from retain.knn import weighted_knn_accuracy
from retain.methods import METHODS, ContinualModel, Method, Stage, mark_trainable
from retain.methods.base import trainable_names
from retain.methods.linear_probe import extract_features
from retain.models import TaskHeads, create_backbone, data_config

__all__ = ["RunContext", "build_run", "run", "fit_task", "train_epoch", "evaluate", "seed_everything",
           "build_optimizer", "build_scheduler", "resolve_device", "RunError"]  # fmt: skip

STATE_FILE = "run_state.json"


class RunError(RuntimeError):
    """A run cannot start or continue as asked; the message says why and what to do."""


@dataclass
class RunContext:
    """What the loop needs besides the method: device, precision, logging."""

    train: TrainConfig
    device: torch.device
    writer: Any = None  # TensorBoard SummaryWriter or None
    step: int = 0
    seed: int = 0
    log_every: int = 10
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def autocast(self) -> torch.autocast:
        enabled = self.train.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------------------------------- set-up helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


def _normalization(cfg: RunConfig, dcfg: dict) -> tuple[Any, Any]:
    choice = cfg.data.normalize
    if choice == "backbone":
        return dcfg["mean"], dcfg["std"]
    if choice == "none":
        return None, None
    if choice == "imagenet":
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if choice == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    raise ConfigError(f"data.normalize={choice!r}; valid: backbone, none, imagenet, half")


def build_datasets(cfg: RunConfig, dcfg: dict) -> tuple[Dataset, Dataset, Dataset]:
    """(train with train transform, test, train with test transform) for ``cfg.data``."""
    d = cfg.data
    size = d.image_size or dcfg["input_size"][-1]
    mean, std = _normalization(cfg, dcfg)
    common = dict(image_size=size, mean=mean, std=std, resize=d.resize, interpolation=d.interpolation)
    train_tf = build_transform(True, augment=d.augment, rrc_scale=d.rrc_scale, **common)
    test_tf = build_transform(False, **common)
    options = dict(d.options)
    if d.name == "imagefolder" and "manifest" not in options:
        options["manifest"] = str(Path(cfg.out_dir) / cfg.name / "split_manifest.json")
    kw = dict(root=d.root, download=d.download, cache_dir=d.cache_dir, **options)
    train = create_dataset(d.name, "train", **kw)
    test = create_dataset(d.name, "test", **kw)
    return train.with_transform(train_tf), test.with_transform(test_tf), train.with_transform(test_tf)


def build_model(cfg: RunConfig, scenario: Scenario | None = None, classes_per_task: list[int] | None = None):
    """Backbone (without classifier) + one linear head per task."""
    m = cfg.model
    backbone = create_backbone(m.backbone, pretrained=m.pretrained, weights=m.weights, **m.kwargs)
    sizes = scenario.classes_per_task if scenario is not None else classes_per_task
    return ContinualModel(backbone, TaskHeads(backbone.num_features, sizes))


def build_run(cfg: RunConfig, device: torch.device | None = None) -> tuple[Scenario, Method]:
    """Data, scenario, model and method for ``cfg`` (no training)."""
    device = device or resolve_device(cfg.train.device)
    m = cfg.model
    probe = create_backbone(m.backbone, pretrained=False, **m.kwargs)
    dcfg = data_config(probe)
    train, test, train_eval = build_datasets(cfg, dcfg)
    if cfg.data.num_classes is not None and cfg.data.num_classes != len(train.classes):
        raise ConfigError(f"data.num_classes={cfg.data.num_classes} but {cfg.data.name} has {len(train.classes)}")
    scenario = create_scenario(train, test, cfg.scenario, train_eval, seed=cfg.seed)
    model = build_model(cfg, scenario).to(device)
    method = METHODS.get(cfg.method.name)(cfg.method, model, scenario, cfg.train)
    method.device = device
    return scenario, method


# --------------------------------------------------------------------------------------------------- optimisation


def build_optimizer(params: list[nn.Parameter], train: TrainConfig, stage: Stage) -> torch.optim.Optimizer:
    name = stage.optimizer or train.optimizer
    lr = stage.lr if stage.lr is not None else train.lr
    wd = stage.weight_decay if stage.weight_decay is not None else train.weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=train.betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=train.betas, weight_decay=wd)
    raise ConfigError(f"train.optimizer={name!r}; valid: sgd, adam, adamw")


def build_scheduler(opt: torch.optim.Optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: int):
    """Per-step LR multiplier: linear warm-up, then constant or cosine down to ``min_lr``."""
    warmup = train.warmup_steps or round(train.warmup_epochs * steps_per_epoch)
    base = opt.param_groups[0]["lr"]
    floor = train.min_lr / base if base > 0 else 0.0
    if train.schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.schedule={train.schedule!r}; valid: constant, cosine")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loader(data: Dataset, batch_size: int, shuffle: bool, ctx: RunContext, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    drop_last = ctx.train.drop_last and len(data) >= batch_size
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=gen,
                      num_workers=ctx.train.num_workers, pin_memory=ctx.device.type == "cuda")  # fmt: skip


def train_epoch(method: Method, loader: DataLoader, opt, sched, stage: Stage, ctx: RunContext, desc: str) -> dict:
    """One pass over ``loader``: the method's loss terms are summed, backpropagated and stepped here."""
    params = [p for g in opt.param_groups for p in g["params"]]
    totals: dict[str, float] = {}
    n = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not ctx.train.progress, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        with ctx.autocast:
            terms = method.loss((x, y), stage)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise RunError(f"loss became {loss.item()} in {desc}; lower train.lr or set train.grad_clip")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.train.grad_clip:
            nn.utils.clip_grad_norm_(params, ctx.train.grad_clip)
        opt.step()
        sched.step()
        n += 1
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.item()
        if ctx.writer is not None and ctx.step % ctx.log_every == 0:
            for k, v in terms.items():
                ctx.writer.add_scalar(f"loss/{k}", v.item(), ctx.step)
            ctx.writer.add_scalar("lr", opt.param_groups[0]["lr"], ctx.step)
        ctx.step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {k: v / max(n, 1) for k, v in totals.items()}


def fit_stage(method: Method, task: Task, stage: Stage, ctx: RunContext, index: int = 0) -> None:
    model = method.model
    mark_trainable(model, stage.params)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or stage.epochs <= 0:
        return
    data = stage.data if stage.data is not None else method.train_dataset(task)
    seed = ctx.seed + 1000 * task.index + index  # each stage of each task shuffles differently, reproducibly
    loader = _loader(data, stage.batch_size or ctx.train.batch_size, True, ctx, seed=seed)
    opt = build_optimizer(params, ctx.train, stage)
    sched = build_scheduler(opt, ctx.train, stage.epochs * len(loader), len(loader))
    model.train()
    for epoch in range(stage.epochs):
        desc = f"task {task.index} {stage.name} {epoch + 1}/{stage.epochs}"
        losses = train_epoch(method, loader, opt, sched, stage, ctx, desc)
        ctx.history.append({"task": task.index, "stage": stage.name, "epoch": epoch, **losses})


def fit_task(method: Method, task: Task, ctx: RunContext) -> tuple[float, int]:
    """Run the method's stages for ``task``; returns (seconds, parameters trained in any stage)."""
    start = time.perf_counter()
    method.model.head.n_active = task.index + 1
    method.before_task(task)
    trained: set[str] = set()
    for i, stage in enumerate(method.stages(task)):
        fit_stage(method, task, stage, ctx, i)
        trained |= set(trainable_names(method.model, stage.params)) if stage.epochs > 0 else set()
    method.after_task(task)
    mark_trainable(method.model, [])
    params = dict(method.model.named_parameters())
    return time.perf_counter() - start, sum(params[n].numel() for n in trained)


# --------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(method: Method, scenario: Scenario, upto: int, ctx: RunContext) -> tuple[list[float], float | None]:
    """Accuracy (%) on tasks 0..upto after training task ``upto``, and task-id accuracy when predicted."""
    method.model.eval()
    n_seen = scenario.seen_classes(upto)
    task_of = scenario.task_of_label().to(ctx.device)
    accs, tid_hits, tid_total = [], 0, 0
    for task in scenario.tasks[: upto + 1]:
        correct = total = 0
        task_id = task.index if scenario.protocol == "task_il" else None
        for x, y in _loader(task.test, ctx.train.eval_batch_size, False, ctx):
            x, y = x.to(ctx.device), y.to(ctx.device)
            with ctx.autocast:
                out = method.predict(x, task_id)
            logits, task_pred = out if isinstance(out, tuple) else (out, None)
            pred = _argmax(logits.float(), task, n_seen, scenario.protocol)
            correct += (pred == y).sum().item()
            total += len(y)
            if task_pred is not None:
                tid_hits += (task_pred == task_of[y]).sum().item()
                tid_total += len(y)
        accs.append(100.0 * correct / max(total, 1))
    return accs, (100.0 * tid_hits / tid_total if tid_total else None)


def _argmax(logits: torch.Tensor, task: Task, n_seen: int, protocol: str) -> torch.Tensor:
    if protocol == "task_il":  # task id known: argmax within the task's own labels
        return logits[:, task.offset : task.offset + task.n_classes].argmax(1) + task.offset
    return logits[:, :n_seen].argmax(1)  # class-incremental: any class seen so far


@torch.no_grad()
def retention_accuracy(method: Method, cfg: RunConfig, sets: tuple[Dataset, Dataset] | None) -> float | None:
    """Weighted k-NN accuracy of the current backbone on the retention dataset (None when not configured)."""
    if sets is None:
        return None
    bs, dev = cfg.train.eval_batch_size, method.device
    tr = extract_features(method.model, sets[0], bs, dev).tensors
    te = extract_features(method.model, sets[1], bs, dev).tensors
    r = cfg.data.retention
    return weighted_knn_accuracy(tr[0], tr[1], te[0], te[1], k=r.k, temperature=r.temperature)


def _retention_sets(cfg: RunConfig, like: Dataset) -> tuple[Dataset, Dataset] | None:
    r = cfg.data.retention
    if r.name is None:
        return None
    kw = dict(root=r.root, cache_dir=cfg.data.cache_dir, **r.options)
    tf = like.transform
    return (create_dataset(r.name, "train", **kw).with_transform(tf),
            create_dataset(r.name, "test", **kw).with_transform(tf))  # fmt: skip


# --------------------------------------------------------------------------------------------------- run + resume


def _run_dir(cfg: RunConfig, resume: bool) -> Path:
    out = Path(cfg.out_dir) / cfg.name
    state = out / STATE_FILE
    if state.exists() and not resume:
        raise RunError(
            f"run directory {out} already holds a run; continue it with --resume, or pick another name=NEW_NAME"
        )
    if resume and (out / "config.yaml").exists():
        import yaml

        saved = yaml.safe_load((out / "config.yaml").read_text())
        _check_same(saved, config_to_dict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    return out


_FREE_KEYS = {"train.progress", "train.tensorboard", "train.num_workers", "train.device", "train.threads"}


def _check_same(saved: dict, now: dict, prefix: str = "") -> None:
    for key in sorted(set(saved) | set(now)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_same(a, b, path + ".")
        elif a != b and path not in _FREE_KEYS:
            raise RunError(f"--resume with a different config: {path} was {a!r}, now {b!r}; use the saved config")


def _load_state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"finished_tasks": 0, "rows": [], "task_ids": []}


def _save_checkpoint(method: Method, out: Path, t: int) -> str:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in method.checkpoint_state().items()}
    rel = f"checkpoints/task_{t:03d}.safetensors"
    (out / "checkpoints").mkdir(exist_ok=True)
    save_file(state, str(out / rel), metadata={"task": str(t), "method": method.name})
    return rel


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: an interrupted write never corrupts finished results


def _metrics_record(cfg: RunConfig, scenario: Scenario, state: dict) -> dict:
    rows = state["rows"]
    T = scenario.n_tasks
    matrix = [row + [None] * (T - len(row)) for row in rows]
    record = {
        "run": cfg.name, "method": cfg.method.name, "backbone": cfg.model.backbone, "dataset": cfg.data.name,
        "protocol": scenario.protocol, "n_tasks": T, "finished_tasks": len(rows),
        "class_order": scenario.class_order, "accuracy_matrix": matrix,
        "task_id_accuracy": state["task_ids"] if any(v is not None for v in state["task_ids"]) else None,
        "task_time_s": state.get("task_time_s", []), "trainable_params": state.get("trainable_params", []),
        "bytes_per_task": state.get("bytes_per_task", []), "total_time_s": sum(state.get("task_time_s", [])),
        "retention_knn": state.get("retention", []) or None,
    }  # fmt: skip
    if rows:
        square = [r[: len(rows)] + [float("nan")] * (len(rows) - len(r)) for r in rows]
        tid = [v for v in state["task_ids"] if v is not None]
        record["metrics"] = metrics.summarize(square, tid or None)
    return record


def _open_writer(cfg: RunConfig, out: Path):
    if not cfg.train.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def run(cfg: RunConfig, resume: bool = False, log=print) -> dict:
    """Train ``cfg.method`` over the scenario, evaluating after each task; returns the metrics record.

    Writes ``runs/<name>/{config.yaml, metrics.json, run_state.json, checkpoints/, tb/}``.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = _run_dir(cfg, resume)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    scenario, method = build_run(cfg, device)
    save_config(cfg, out / "config.yaml")
    state = _load_state(out)
    method.setup()
    if state["finished_tasks"]:
        _resume(method, scenario, state, out, log)
    ctx = RunContext(cfg.train, device, _open_writer(cfg, out), seed=cfg.seed)
    retention = _retention_sets(cfg, scenario.tasks[0].test.base)
    if retention is not None and not state.get("retention"):
        state["retention"] = [retention_accuracy(method, cfg, retention)]
    for task in scenario.tasks[state["finished_tasks"] :]:
        seed_everything(cfg.seed + task.index)
        seconds, n_trained = fit_task(method, task, ctx)
        accs, tid = evaluate(method, scenario, task.index, ctx)
        _record_task(cfg, method, task, state, accs, tid, seconds, n_trained, ctx, retention)
        if cfg.checkpoint:
            state["checkpoint"] = _save_checkpoint(method, out, task.index)
        _write_json(out / STATE_FILE, state)
        _write_json(out / "metrics.json", _metrics_record(cfg, scenario, state))
        log(f"[{cfg.name}] task {task.index + 1}/{scenario.n_tasks}: acc " + " ".join(f"{a:.1f}" for a in accs)
            + (f" | task-id {tid:.1f}" if tid is not None else "") + f" | {seconds:.1f}s")  # fmt: skip
    if ctx.writer is not None:
        ctx.writer.close()
    record = _metrics_record(cfg, scenario, state)
    _write_json(out / "metrics.json", record)
    return record


def _record_task(cfg, method, task, state, accs, tid, seconds, n_trained, ctx, retention) -> None:
    state["finished_tasks"] = task.index + 1
    state["rows"].append(accs)
    state["task_ids"].append(tid)
    state.setdefault("task_time_s", []).append(seconds)
    state.setdefault("trainable_params", []).append(n_trained)
    state.setdefault("bytes_per_task", []).append(method.bytes_per_task(task))
    if retention is not None:
        state["retention"].append(retention_accuracy(method, cfg, retention))
    if ctx.writer is not None:
        for i, a in enumerate(accs):
            ctx.writer.add_scalar(f"acc/task_{i}", a, task.index)
        ctx.writer.add_scalar("acc/average", sum(accs) / len(accs), task.index)


def _resume(method: Method, scenario: Scenario, state: dict, out: Path, log) -> None:
    done = state["finished_tasks"]
    ckpt = out / state["checkpoint"]
    if not ckpt.exists():
        raise RunError(f"--resume: checkpoint {ckpt} is missing; start a new run with another name=...")
    method.load_checkpoint_state(load_file(str(ckpt), device=str(method.device)))
    method.model.head.n_active = done
    method.resume(scenario.tasks[done - 1])
    log(f"[resume] {done} finished task(s) loaded from {ckpt}")
