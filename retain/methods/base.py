"""The method contract. The engine owns the loop and the optimiser step; a method contributes hooks:

- ``bind(ctx)``: the run context, stored once per run (extra passes over data go through ``self.loader(data)``);
- ``setup()`` once, ``before_task(task)``, ``stages(task)`` (what to train, for how long, with which optimiser and
  loss), ``loss(batch, stage) -> {name: tensor}`` (a stage may bring its own ``Stage.loss``; the engine sums the
  terms and logs each), ``after_task(task)``;
- ``predict(x, task_id) -> Prediction`` and ``features(x)`` (the retention probe), both run inside
  ``with deployed():`` (the model as deployed, e.g. adapters merged; training resumes from the state on exit);
- what it stores: ``checkpoint_state()`` / ``load_checkpoint_state()`` / ``resume()`` (a run continues from them),
  ``deployed_state()`` (what an artefact keeps, ``retain.artefact``) and ``task_state(task)`` (what task t alone
  owns; ``bytes_per_task`` is its size).

Methods whose tasks own parameters chosen by task id (LN tuning, LoRA, Block Expansion) share
``retain.methods.per_task.PerTaskMethod``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, TensorDataset

from retain.config import METHOD_CONFIGS, config_name
from retain.data.scenarios import Scenario, Task
from retain.features import extract_features
from retain.metrics import storage_rule
from retain.models.adapters import mark_trainable, trainable_names
from retain.models.continual import ContinualModel, head_prefix
from retain.registry import Registry

if TYPE_CHECKING:
    from retain.engine.context import RunContext

__all__ = [
    "tensor_bytes",
    "MethodConfig",
    "Method",
    "Stage",
    "Prediction",
    "Batch",
    "ContinualModel",
    "METHODS",
    "register_method",
    "mark_trainable",
    "trainable_names",
]  # fmt: skip  (ContinualModel, mark_trainable, trainable_names: re-exported from models)

METHODS = Registry("method")
Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs (B, ...), labels (B,))


def register_method(cls: type[Method] | str | None = None, /) -> Any:
    """Class decorator, used bare (``@register_method``) on a Method subclass with its own ``config_class``.

    The method's name is written once, as the default of its config's ``name`` field; it becomes ``cls.name``,
    the ``METHODS`` key of ``cls`` and the ``retain.config.METHOD_CONFIGS`` key of ``cls.config_class`` (which
    ``method.name=...`` looks up). ``@register_method("x")`` is accepted only where ``"x"`` is that name.
    """
    explicit = cls if isinstance(cls, str) else None

    def deco(method: type[Method]) -> type[Method]:
        name = config_name(method.config_class)
        if explicit is not None and explicit != name:
            raise ValueError(
                f"@register_method({explicit!r}) on {method.__name__}: its config_class's name is {name!r}; "
                "write the name once, in the config, and use a bare @register_method"
            )
        if name in METHODS or name in METHOD_CONFIGS:
            raise ValueError(
                f"method {name!r} is already registered (does {method.__name__} define its own config_class?)"
            )
        method.name = name
        METHOD_CONFIGS.register(name)(method.config_class)
        return METHODS.register(name)(method)

    return deco if cls is None or explicit is not None else deco(cls)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the data of ``tensors`` (what a safetensors file of them holds, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MethodConfig:
    """Options every method has. Each method subclasses it with ``name: str = "<method>"``: the only place its
    name is written (``register_method`` derives it from there; it is also the method's file stem)."""

    name: str = ""
    train_mask: str = "seen"  # class-IL training CE over: seen | current (task's classes only) | all


@dataclass
class Stage:
    """One phase of training a task: which parameters, for how long, optimiser overrides, optional data and loss.

    The budget is ``steps`` optimiser steps when set, else ``epochs`` passes over the data. ``data`` may be a
    dataset or a zero-argument callable building one when the stage starts (e.g. features that depend on what
    the stage before trained; never on what this stage trains: a stage resumed mid-way rebuilds it from the saved
    weights); None means the task's training images. ``validate``: evaluate the task's validation split (if any)
    after each epoch (None: only when ``data`` is None). ``loss``: this stage's ``batch -> {name: tensor}`` (None:
    ``method.loss(batch, stage)``).
    """

    name: str
    epochs: int
    params: list[str]  # parameter-name patterns of ``method.model`` (prefixes or globs, ``adapters.matches``)
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    data: Dataset | Callable[[], Dataset] | None = None
    batch_size: int | None = None
    steps: int | None = None
    loss: Callable[[Batch], dict[str, torch.Tensor]] | None = None
    validate: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_budget(self) -> bool:
        return (self.steps if self.steps is not None else self.epochs) > 0


@dataclass
class Prediction:
    """What ``Method.predict`` returns: logits (B, C) over every scenario label (unseen classes masked), and the
    task each sample was routed to (B,) by methods that select a task at test time (None otherwise)."""

    logits: torch.Tensor
    task_ids: torch.Tensor | None = None


class Method:
    """Base class: plain cross-entropy fine-tuning of the parameters named by ``trainable_prefixes``."""

    name = "base"
    config_class = MethodConfig
    task_aware_predict = False  # True when ``predict(x, task_id)`` uses the task id beyond slicing the logits
    # train.compile: None when the backbone's forward_features can be compiled once for the run, else the reason
    # it cannot (the backbone changes per task, or hooks inside it); ``retain.engine.compiling``
    compile_blocker: str | None = None

    def __init__(self, cfg: MethodConfig, model: ContinualModel, scenario: Scenario, train_cfg: Any) -> None:
        self.cfg, self.model, self.scenario, self.train_cfg = cfg, model, scenario, train_cfg
        self.task: Task | None = None
        self.device = torch.device("cpu")
        self.ctx: RunContext | None = None  # ``bind``

    def bind(self, ctx: RunContext) -> None:
        """Called by the engine with the run's context before the method's first pass over data in a run."""
        self.ctx = ctx

    def to(self, device: torch.device | str) -> Method:
        """Move the model and every other module the method holds (frozen copies, query models) to ``device``."""
        self.device = torch.device(device)
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(self.device)
        return self

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Called once before the first task."""

    def before_task(self, task: Task) -> None:
        """Called before the task's stages. Resuming from a mid-task checkpoint calls it again on the state the
        task started from, then loads the saved ``checkpoint_state()``: what it sets up must follow from that."""
        self.task = task

    def trainable_prefixes(self, task: Task) -> list[str]:
        return ["backbone.", head_prefix(task.index)]

    def stages(self, task: Task) -> list[Stage]:
        return [Stage("train", self.train_cfg.epochs, self.trainable_prefixes(task), steps=self.train_cfg.steps)]

    def trained_names(self, task: Task, stages: list[Stage] | None = None) -> list[str]:
        """Names of the parameters some stage of ``task`` trains: what a run counts and ``retain inspect`` shows."""
        names: set[str] = set()
        for stage in self.stages(task) if stages is None else stages:
            names |= set(trainable_names(self.model, stage.params)) if stage.has_budget else set()
        return [n for n, _ in self.model.named_parameters() if n in names]

    def loss(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.mask_logits(self.model(x), y)  # (B, C)
        return {"ce": self.ce(logits, y)}

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the run's label smoothing."""
        return F.cross_entropy(logits, y, label_smoothing=self.train_cfg.label_smoothing)

    def after_task(self, task: Task) -> None:
        """Called after the task's stages; snapshot what later tasks need."""

    def task_record(self, task: Task) -> dict[str, Any] | None:
        """What ``metrics.json`` keeps of this finished task beyond accuracy (its ``method_records``; JSON values,
        the same on every process), e.g. L2P's prompt-selection counts; None: nothing."""
        return None

    def resume(self, last_task: Task) -> None:
        """Called after a checkpoint of ``last_task`` was loaded; rebuild any state not held in tensors."""
        self.task = last_task

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits over all scenario labels (unseen masked); ``task_id``: the task is known (task-incremental)."""
        return Prediction(self.model(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) backbone features as deployed (routing, merged adapters): what the retention k-NN probes."""
        return self.model.features(x)

    @contextmanager
    def deployed(self) -> Iterator[None]:
        """The method as deployed for the duration of a ``with`` block (every evaluation, the retention probe, a
        loaded artefact): e.g. adapters merged into the weights. On exit, the state training continues from."""
        yield

    # ---- extra passes over data -----------------------------------------------------------------------------------
    def loader(self, data: Dataset, batch_size: int | None = None) -> DataLoader:
        """An in-order loader for a pass that is not training (Fisher, prototypes, keys, caches); built by the
        engine when it runs the method, so multi-process runs can shard it."""
        batch_size = batch_size or self.train_cfg.eval_batch_size
        if self.ctx is not None:
            return self.ctx.pass_loader(data, batch_size)
        return DataLoader(data, batch_size=batch_size, shuffle=False)

    @torch.no_grad()
    def extract_features(self, data: Dataset, forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         batch_size: int | None = None) -> TensorDataset:  # fmt: skip
        """(features (N, D), labels (N,)) of ``data`` in eval mode through ``forward`` (default the model's
        backbone features); the model's train/eval mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        data = extract_features(forward or self.model.features, self.loader(data, batch_size), self.device)
        self.model.train(was_training)
        return data

    # ---- helpers --------------------------------------------------------------------------------------------------
    @staticmethod
    def seen_heads(task: Task) -> list[str]:
        """Prefixes of the heads of tasks 0..task (the ones a seen-class CE gives gradients to)."""
        return [head_prefix(i) for i in range(task.index + 1)]

    def mask_logits(self, logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Restrict the training CE to the classes ``cfg.train_mask`` names (labels outside get -inf).

        Class-IL: ``seen`` keeps tasks 0..t, ``current`` task t only. Task-IL (``seen`` or ``current``): with the
        labels ``y`` each sample keeps its own task's classes (joint and replay feed old tasks' samples; FACIL's
        multi-head CE ``outputs[t]``); without them, task t's classes. ``all``: no mask.
        """
        task = self.task
        if self.cfg.train_mask == "all" or task is None:
            return logits
        if y is not None and self.scenario.protocol == "task_il":
            label_task = self._label_tasks(logits.device)  # (C,)
            own = label_task[: logits.shape[1]].unsqueeze(0) == label_task[y].unsqueeze(1)  # (B, C)
            return logits.masked_fill(~own, float("-inf"))
        lo = task.offset if (self.cfg.train_mask == "current" or self.scenario.protocol == "task_il") else 0
        hi = task.offset + task.n_classes
        mask = torch.full_like(logits, float("-inf"))
        mask[:, lo:hi] = 0
        return logits + mask

    def _label_tasks(self, device: torch.device) -> torch.Tensor:
        """(C,) task index of every scenario label on ``device``, built once per device (``mask_logits``)."""
        cached = getattr(self, "_label_task_cache", None)
        if cached is None or cached.device != device:
            cached = self._label_task_cache = self.scenario.task_of_label().to(device)
        return cached

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save after each task and inside one (mid-task checkpoints) so a run can resume: every tensor
        a stage trains or a step changes (default: every parameter and buffer of the model)."""
        return {k: v for k, v in self.model.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(state) - set(self.model.state_dict())
        if missing:
            raise ValueError(
                f"checkpoint has unknown tensors (first: {sorted(missing)[0]}); was it made by this config?"
            )
        self.model.load_state_dict(state, strict=False)

    def deployed_state(self) -> dict[str, torch.Tensor]:
        """The model tensors prediction needs: ``checkpoint_state()`` less what only training uses (an artefact keeps
        those that differ from a freshly built model)."""
        own = self.model.state_dict()
        return {k: v for k, v in self.checkpoint_state().items() if k in own}

    def task_state(self, task: Task) -> dict[str, torch.Tensor]:
        """What a deployment keeps to serve ``task`` beyond what it would keep without it, by name
        (``retain.metrics.storage_rule``): in a stream, the tensors or row slices the task alone owns (default: its
        head; tensors every task shares and overwrites belong to the model); with one task per deployment (the
        fine-tuning protocol), also everything the task trained (``trained_state``). Methods add what they own."""
        state = {n: p for n, p in self.model.named_parameters() if n.startswith(head_prefix(task.index))}
        if storage_rule(self.scenario.protocol) == "deployment":
            state = self.trained_state(task) | state
        return state

    def trained_state(self, task: Task) -> dict[str, torch.Tensor]:
        """The deployed tensors ``task``'s stages change: the parameters they train (``trained_names`` within
        ``deployed_state``) and, when a stage runs the task's images through the model in train mode (its data are
        the images, or it trains the backbone), every BatchNorm's running statistics."""
        stages = [s for s in self.stages(task) if s.has_budget]
        deployed, names = self.deployed_state(), set(self.trained_names(task, stages))
        state = {n: deployed[n] for n in deployed if n in names}
        if any(s.data is None for s in stages) or any(n.startswith("backbone.") for n in names):
            for prefix, m in self.model.named_modules():
                if isinstance(m, _BatchNorm) and m.track_running_stats:
                    state |= {f"{prefix}.{b}": deployed[f"{prefix}.{b}"] for b in ("running_mean", "running_var")}
        return state

    def bytes_per_task(self, task: Task) -> int:
        """Bytes a deployment keeps for ``task`` beyond what it keeps without it: the size of ``task_state(task)``."""
        return tensor_bytes(self.task_state(task).values())

    def checkpoint_bytes(self, task: Task, unchanged: Collection[str] = ()) -> int:
        """Bytes of the tensors a per-task checkpoint holds after ``task`` (``checkpoint_state()`` then), from tensor
        sizes without training: ``retain inspect``'s disk estimate. ``unchanged``: names of the model's tensors that
        ``setup`` left as built; a checkpoint leaves out those still equal to the model the run started from, so the
        parameters among them that no stage of tasks 0..``task`` trains are not counted where they are the backbone's,
        a later task's head or a later task's stage trains them. The rest is counted (buffers, tensors hooks may set,
        trained parameters even if they end as they began): an upper bound. Methods whose ``after_task`` adds tensors
        to their checkpoint state add those."""
        current, seen, self.task = self.task, self.model.head.n_active, task
        try:
            state, params = self.checkpoint_state(), dict(self.model.named_parameters())
            trained: list[set[str]] = []  # by task
            for t in self.scenario.tasks if unchanged else ():
                self.model.set_seen(t.index + 1)
                trained.append(set(self.trained_names(t)))
            now, later = set().union(*trained[: task.index + 1]), set().union(*trained[task.index + 1 :])
            idle = (set(unchanged) & set(params)) - now  # untrained so far, as built
            heads = tuple(head_prefix(t.index) for t in self.scenario.tasks[task.index + 1 :])
            frozen = {k for k in idle if k in later or k.startswith(("backbone.", *heads))}
            return tensor_bytes(v for k, v in state.items() if k not in frozen)
        finally:
            self.task = current
            self.model.set_seen(seen)
