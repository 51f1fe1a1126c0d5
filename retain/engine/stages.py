"""The stage loop: one ``StageLoop`` per stage of a task holds its optimiser, schedule, budget (epochs or steps),
validation and position (stage, epoch, batch, step, RNG states), so a checkpoint can stop and continue it exactly.
This module alone steps an optimiser.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from retain import distributed
from retain.config import ConfigError, TrainConfig
from retain.data.scenarios import Task
from retain.engine.context import NonFiniteLoss, RunContext, RunError
from retain.engine.schedules import Schedule, build_schedule
from retain.methods.base import Method, Stage
from retain.models.adapters import mark_trainable

__all__ = ["StageLoop", "Position", "build_optimizer", "fit_stage", "rng_state", "set_rng_state", "global_batch",
           "stage_loss"]  # fmt: skip


def stage_loss(method: Method, stage: Stage, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss terms of one batch: the stage's own ``Stage.loss``, else ``method.loss(batch, stage)``."""
    return stage.loss(batch) if stage.loss is not None else method.loss(batch, stage)


def build_optimizer(params: list[nn.Parameter], train: TrainConfig, stage: Stage) -> torch.optim.Optimizer:
    """A fresh optimiser for one stage: ``train``'s choice, with the stage's overrides; the lr times the batch
    rule's factor (``distributed.batch_plan``: 1 unless ``train.lr_scaling=linear``)."""
    name = stage.optimizer or train.optimizer
    lr = (stage.lr if stage.lr is not None else train.lr) * distributed.batch_plan(train)["lr_factor"]
    wd = stage.weight_decay if stage.weight_decay is not None else train.weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=train.betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=train.betas, weight_decay=wd)
    raise ConfigError(f"train.optimizer={name!r}; valid: sgd, adam, adamw")


def global_batch(train: TrainConfig, stage: Stage) -> int:
    """Samples per optimiser step over all processes (``train.batch_scope``, ``distributed.batch_plan``);
    ConfigError when a global batch does not split evenly over the processes."""
    size = stage.batch_size or train.batch_size
    return distributed.batch_plan(train, batch_size=size, label=f"stage {stage.name!r} batch")["global_batch"]


class _Step(nn.Module):
    """The method's loss as a module's forward, so that ``DistributedDataParallel`` wraps it and averages the
    gradient of every trainable parameter of ``method.model`` the loss reaches, however the method calls the model
    (``features``, ``head``, several passes). Frozen teachers held by the method are not part of it. In one process
    the loop calls ``method.loss`` directly (``train.compile`` compiles the backbone: ``retain.engine.compiling``)."""

    def __init__(self, method: Method, stage: Stage) -> None:
        super().__init__()
        self.model = method.model
        self.method, self.stage = method, stage  # plain attributes: a Method is not a Module

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return stage_loss(self.method, self.stage, (x, y))


def _wrap(step: _Step, stage: Stage, device: torch.device) -> DistributedDataParallel | None:
    """A fresh DDP over this stage's trainable set (None in one process). ``find_unused_parameters`` only when the
    stage says so (``stage.extra``): a trainable parameter some step leaves without a gradient."""
    if not distributed.active():
        return None
    ids = [device.index] if device.type == "cuda" else None
    unused = bool(stage.extra.get("find_unused_parameters", False))
    return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=unused)


def _cuda_index(device: torch.device | None) -> int:
    """The CUDA device whose generator this process draws from: ``device``'s index, else the current device."""
    if device is not None and device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy and torch global RNG states: the CPU's and, when CUDA is available, that of this process's
    CUDA device only (``device`` or the current one), so a run resumes on any number of visible GPUs."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(_cuda_index(device))
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s states; the CUDA state goes to this process's device (``device`` or the current
    one). An older checkpoint's list (one state per GPU visible then) gives this device's entry, none if it had
    fewer GPUs."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    index = _cuda_index(device)
    if isinstance(cuda, list | tuple):
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, index)


def exact_dtype(device: torch.device) -> torch.dtype:
    """A dtype that holds float32 and bfloat16 values exactly and sums them as the host would: float64, except on
    MPS (no float64; float32 still holds each value exactly)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class _Where:
    """A step, for messages and TensorBoard: the run's step count (1-based) and the stage's position then."""

    step: int
    task: int
    stage: str
    epoch: int
    batch: int

    def __str__(self) -> str:
        return f"step {self.step} (task {self.task}, stage {self.stage!r}, epoch {self.epoch}, batch {self.batch})"


class _Pending:
    """Step values (the summed loss, each term) kept on the device until the host reads them all in one transfer
    (``StageLoop.sync``): no host-device synchronisation inside a step."""

    def __init__(self, device: torch.device) -> None:
        self.dtype = exact_dtype(device)
        self.values: list[torch.Tensor] = []  # per step: (1 + K,) the loss then each term
        self.steps: list[tuple[list[str], _Where, bool, float]] = []  # term names, where, logged, lr

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], where: _Where, logged: bool, lr: float) -> None:
        values = [loss.detach(), *(v.detach() for v in terms.values())]
        self.values.append(torch.stack([v.to(self.dtype).reshape(()) for v in values]))  # (1 + K,)
        self.steps.append((list(terms), where, logged, lr))

    def read(self) -> list[tuple[float, dict[str, float], _Where, bool, float]]:
        """(loss, {term: value}, where, logged, lr) of every pending step, in order; empties the list."""
        if not self.values:
            return []
        rows = torch.cat(self.values).tolist()  # the one host-device sync
        out, i = [], 0
        for names, where, logged, lr in self.steps:
            out.append((rows[i], dict(zip(names, rows[i + 1 : i + 1 + len(names)], strict=True)), where, logged, lr))
            i += 1 + len(names)
        self.values, self.steps = [], []
        return out


@dataclass
class Position:
    """Where a stage loop stands: stage ``stage`` of task ``task``, ``epoch`` epochs finished, ``batch`` batches of
    the current epoch done, ``step`` optimiser steps taken in this stage."""

    task: int = 0
    stage: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0


class StageLoop:
    """Trains one stage of one task: ``StageLoop(method, task, stage, ctx, index).run()``."""

    def __init__(self, method: Method, task: Task, stage: Stage, ctx: RunContext, index: int = 0) -> None:
        self.method, self.task, self.stage, self.ctx = method, task, stage, ctx
        self.pos = Position(task.index, index)
        mark_trainable(method.model, stage.params)
        self.params = [p for p in method.model.parameters() if p.requires_grad]
        self.active = bool(self.params) and stage.has_budget
        if not self.active:
            return
        data = stage.data() if callable(stage.data) else stage.data
        validate = stage.data is None if stage.validate is None else stage.validate
        val = task.val if validate else None  # by default only a stage on the task's own images is validated
        self.validation = val if val is not None and len(val) > 0 else None
        data = task.train if data is None else data
        # each stage of each task shuffles differently, reproducibly
        self.generator = torch.Generator().manual_seed(ctx.seed + 1000 * task.index + index)
        self.n_samples, self.batch_size = len(data), global_batch(ctx.train, stage)
        self.loader = ctx.train_loader(data, self.batch_size, self.generator)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise RunError(f"task {task.index} stage {stage.name!r} has no training batches; lower train.batch_size "
                           "or set train.drop_last=false")  # fmt: skip
        self.total_steps = stage.steps if stage.steps is not None else stage.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.params, ctx.train, stage)
        self.schedule: Schedule = build_schedule(self.optimizer, ctx.train, self.steps_per_epoch, self.total_steps)
        self.totals: dict[str, float] = {}  # the epoch's sum of each term so far (host values, read by sync)
        self.n_steps = 0
        self.bar: tqdm | None = None
        self.stopped = False  # the schedule ended the stage early (plateau: lr below train.stop_lr)
        self._epoch_generator: torch.Tensor | None = None  # generator state at the current epoch's start
        self._resume: dict[str, Any] | None = None
        self.ddp = _wrap(_Step(method, stage), stage, ctx.device)
        self.pending = _Pending(ctx.device)  # step values not yet read on the host (train.sync_every)

    @property
    def done(self) -> bool:
        return not self.active or self.stopped or self.pos.step >= self.total_steps

    # ---- the loop -------------------------------------------------------------------------------------------------
    def run(self, after_step: Callable[[StageLoop], None] | None = None,
            after_epoch: Callable[[StageLoop], None] | None = None) -> None:  # fmt: skip
        """Train until the budget is spent or the schedule stops; ``after_step(self)`` runs after every step and
        ``after_epoch(self)`` after every whole epoch (its position then is the next epoch's start)."""
        if not self.active:
            return
        self.method.model.train()
        while not self.done:
            losses = self.train_epoch(after_step)
            whole = self.pos.batch >= self.steps_per_epoch  # else a step budget ended mid-epoch
            val_loss = self.validate() if whole else None
            row = {"task": self.task.index, "stage": self.stage.name, "epoch": self.pos.epoch, **losses}
            self.ctx.history.append(row | ({"val_loss": val_loss} if val_loss is not None else {}))
            if not whole:
                break
            self.pos.epoch, self.pos.batch = self.pos.epoch + 1, 0
            self.stopped = self.schedule.end_epoch(self.method.model, val_loss)
            if after_epoch is not None:
                after_epoch(self)
        self.schedule.finish(self.method.model)
        if self.ddp is not None:  # buffers (BN statistics) moved on each process after DDP's last broadcast
            distributed.broadcast_buffers(self.method.model)
        self.ddp = None  # its gradient hooks go with it; the next stage wraps its own trainable set
        self.loader = None  # and its worker processes

    def _batches(self, desc: str) -> tuple[tqdm, Iterator]:
        """This epoch's batches and a progress bar; when resuming mid-epoch, the same epoch started at the next
        batch (the sampler skips the finished ones: nothing of them is read) with the RNG states restored."""
        resume, self._resume = self._resume, None
        if resume is not None:
            self.generator.set_state(resume["generator"])
            set_rng_state(resume["rng"], self.ctx.device)
        self._epoch_generator = self.generator.get_state()
        self.loader.batch_sampler.skip(self.pos.batch)
        quiet = not (self.ctx.train.progress and distributed.is_main())
        bar = tqdm(total=self.steps_per_epoch, initial=self.pos.batch, desc=desc, leave=False, disable=quiet,
                   dynamic_ncols=True)  # fmt: skip
        return bar, iter(self.loader)

    def train_epoch(self, after_step: Callable[[StageLoop], None] | None = None) -> dict[str, float]:
        """One pass (or the rest of one) over the data: the method's loss terms are summed, backpropagated and
        stepped here; returns the mean of each term. The host reads the step values every ``train.sync_every``
        steps (:meth:`sync`), not at every step."""
        ctx, stage = self.ctx, self.stage
        self.totals, self.n_steps = {}, 0
        desc = f"task {self.task.index} {stage.name} {self.pos.epoch + 1}"
        self.bar, batches = self._batches(desc)
        for x, y in batches:
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with ctx.autocast:
                terms = stage_loss(self.method, stage, (x, y)) if self.ddp is None else self.ddp(x, y)
            loss, share = sum(terms.values()), self._share(len(y))
            if share != 1.0:
                loss = loss * share
            self.pending.add(loss, terms, self._where(ctx.step + 1), ctx.step % ctx.log_every == 0, self.schedule.lr)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if ctx.train.grad_clip:
                nn.utils.clip_grad_norm_(self.params, ctx.train.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            self.pos.batch, self.pos.step = self.pos.batch + 1, self.pos.step + 1
            ctx.step += 1
            self.bar.update()
            if self.sync_due:
                self.sync()
            if after_step is not None:
                after_step(self)
            if self.pos.step >= self.total_steps:
                break
        self.sync()
        self.bar.close()
        return self._epoch_mean(self.totals, self.n_steps)

    @property
    def sync_due(self) -> bool:
        """Whether the step just taken is one where the host reads the pending values: every ``train.sync_every``
        steps of the stage, and at the end of an epoch or of the budget (the same steps on every process)."""
        every = self.ctx.train.sync_every
        return (
            self.pos.step % every == 0 or self.pos.batch >= self.steps_per_epoch or self.pos.step >= self.total_steps
        )

    def sync(self) -> None:
        """Read the pending step values on the host (one transfer): NonFiniteLoss naming the first step whose loss
        was not finite, the epoch's sums, TensorBoard, the progress bar. The steps after a non-finite one have
        run, but nothing of them is saved: a checkpoint syncs first."""
        steps = self.pending.read()
        for loss, terms, where, logged, lr in steps:
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss} at {where}")
            for k, v in terms.items():
                self.totals[k] = self.totals.get(k, 0.0) + v
            self.n_steps += 1
            if logged and self.ctx.writer is not None:
                for k, v in terms.items():
                    self.ctx.writer.add_scalar(f"loss/{k}", v, where.step - 1)
                self.ctx.writer.add_scalar("lr", lr, where.step - 1)
        if steps and self.bar is not None:
            self.bar.set_postfix(loss=f"{steps[-1][0]:.3f}", refresh=False)

    def _where(self, step: int) -> _Where:
        return _Where(step, self.task.index, self.stage.name, self.pos.epoch + 1, self.pos.batch + 1)

    def _epoch_mean(self, totals: dict[str, float], n: int) -> dict[str, float]:
        """Each term's mean over the epoch's batches; under several processes over every process's batches (the
        per-step TensorBoard values stay rank 0's slice)."""
        if self.ddp is not None and totals:
            keys = sorted(totals)
            sums = torch.tensor([totals[k] for k in keys] + [float(n)], dtype=torch.float64)
            sums = distributed.all_reduce_sum(sums).tolist()
            totals, n = dict(zip(keys, sums[:-1], strict=True)), int(sums[-1])
        return {k: v / max(n, 1) for k, v in totals.items()}

    def _share(self, n: int) -> float:
        """N x this process's share of the current global batch: 1 in one process and for equal slices; it makes
        DDP's mean over processes the gradient of the mean over the global batch when a last batch splits unevenly
        (a term that does not depend on the batch, such as EWC's penalty, keeps its weight: the shares sum to N)."""
        if self.ddp is None:
            return 1.0
        size = min(self.batch_size, self.n_samples - self.pos.batch * self.batch_size)  # this global batch
        return n * distributed.world_size() / size

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean of the method's summed loss terms over the task's validation split (eval mode), or None."""
        if self.validation is None:
            return None
        model, total, count = self.method.model, 0.0, 0
        model.eval()
        for x, y in self.ctx.eval_loader(self.validation):
            x, y = x.to(self.ctx.device), y.to(self.ctx.device)
            with self.ctx.autocast:
                loss = sum(stage_loss(self.method, self.stage, (x, y)).values())
            total, count = total + loss.detach().to(exact_dtype(loss.device)) * len(y), count + len(y)
        model.train()
        sums = torch.tensor([float(total), count], dtype=torch.float64)  # the one sync of the pass
        if distributed.active():  # every process's shard, summed: all take the same schedule decision
            sums = distributed.all_reduce_sum(sums)
        total, count = sums.tolist()
        return total / max(count, 1)

    # ---- position -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this stage exactly from here (call between steps)."""
        mid_epoch = self.pos.batch > 0
        return {
            "position": asdict(self.pos), "stopped": self.stopped, "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "rng": rng_state(self.ctx.device),
            "generator": self._epoch_generator if mid_epoch else self.generator.get_state(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; the model's weights are loaded separately (they are the method's)."""
        self.pos = Position(**state["position"])
        self.stopped = state["stopped"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        if self.pos.batch > 0:
            self._resume = {"generator": state["generator"], "rng": state["rng"]}
        else:
            set_rng_state(state["rng"], self.ctx.device)


def fit_stage(method: Method, task: Task, stage: Stage, ctx: RunContext, index: int = 0) -> StageLoop:
    """Train one stage from its start; returns the finished loop."""
    loop = StageLoop(method, task, stage, ctx, index)
    loop.run()
    return loop
