"""The method lifecycle. The engine owns the loop and the optimiser step; a method contributes hooks:

``setup()`` once, ``before_task(task)``, ``stages(task)`` (what to train, for how long, with which optimiser),
``loss(batch, stage) -> {name: tensor}`` (summed by the engine, each term logged), ``after_task(task)``, and
``predict(x, task_id)`` where inference differs from ``model(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from retain.data.scenarios import Scenario, Task
from retain.registry import Registry

__all__ = ["MethodConfig", "Method", "Stage", "ContinualModel", "METHODS", "register_method", "mark_trainable",
           "trainable_names"]  # fmt: skip

METHODS = Registry("method")


def register_method(name: str):
    """Class decorator: ``@register_method("finetune")`` on a Method subclass with a ``config_class``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


@dataclass
class MethodConfig:
    name: str = ""
    train_mask: str = "seen"  # class-IL training CE over: seen | current (task's classes only) | all


@dataclass
class Stage:
    """One phase of training a task: which parameters, how many epochs, optimiser overrides, optional data."""

    name: str
    epochs: int
    params: list[str]  # parameter-name prefixes of ``method.model`` trained in this stage
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    data: Dataset | None = None  # None: method.train_dataset(task)
    batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ContinualModel(nn.Module):
    """A backbone (timm surface, no classifier) and task heads."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, C)


def mark_trainable(model: nn.Module, prefixes: list[str]) -> int:
    """Freeze every parameter whose name starts with none of ``prefixes``; returns the trainable count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
        n += p.numel() if p.requires_grad else 0
    return n


def trainable_names(model: nn.Module, prefixes: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)]


class Method:
    """Base class: plain cross-entropy fine-tuning of the parameters named by ``trainable_prefixes``."""

    name = "base"
    config_class = MethodConfig

    def __init__(self, cfg: MethodConfig, model: ContinualModel, scenario: Scenario, train_cfg: Any) -> None:
        self.cfg, self.model, self.scenario, self.train_cfg = cfg, model, scenario, train_cfg
        self.task: Task | None = None
        self.device = torch.device("cpu")

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Called once before the first task."""

    def before_task(self, task: Task) -> None:
        self.task = task

    def trainable_prefixes(self, task: Task) -> list[str]:
        return ["backbone.", f"head.heads.{task.index}."]

    def stages(self, task: Task) -> list[Stage]:
        return [Stage("train", self.train_cfg.epochs, self.trainable_prefixes(task))]

    def train_dataset(self, task: Task) -> Dataset:
        return task.train

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.mask_logits(self.forward_train(x))  # (B, C)
        return {"ce": F.cross_entropy(logits, y, label_smoothing=self.train_cfg.label_smoothing)}

    def after_task(self, task: Task) -> None:
        """Called after the task's stages; snapshot what later tasks need."""

    def resume(self, last_task: Task) -> None:
        """Called after a checkpoint of ``last_task`` was loaded; rebuild any state not held in tensors."""
        self.task = last_task

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits over all scenario labels (unseen masked); optionally also predicted task ids (B,)."""
        return self.model(x)

    # ---- helpers --------------------------------------------------------------------------------------------------
    @staticmethod
    def seen_heads(task: Task) -> list[str]:
        """Prefixes of the heads of tasks 0..task (the ones a seen-class CE gives gradients to)."""
        return [f"head.heads.{i}." for i in range(task.index + 1)]

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Restrict the training CE to the classes ``cfg.train_mask`` names (labels outside get -inf)."""
        task = self.task
        if self.cfg.train_mask == "all" or task is None:
            return logits
        lo = task.offset if (self.cfg.train_mask == "current" or self.scenario.protocol == "task_il") else 0
        hi = task.offset + task.n_classes
        mask = torch.full_like(logits, float("-inf"))
        mask[:, lo:hi] = 0
        return logits + mask

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save after each task so a run can resume (default: every parameter and buffer trained)."""
        return {k: v for k, v in self.model.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(state) - set(self.model.state_dict())
        if missing:
            raise ValueError(
                f"checkpoint has unknown tensors (first: {sorted(missing)[0]}); was it made by this config?"
            )
        self.model.load_state_dict(state, strict=False)

    def bytes_per_task(self, task: Task) -> int:
        """Bytes a deployment keeps for this task on top of the shared model (default: the task's head rows)."""
        return sum(p.numel() * p.element_size() for p in self.model.head.heads[task.index].parameters())
