"""ConFiT (Jie, Deng, Li, "Alleviating Representational Shift for Continual Fine-tuning", CVPRW 2022, 2204.10535).

Task-incremental continual fine-tuning of a pre-trained CNN. Each task is trained hierarchically: the task's head
alone for the first E//5 epochs, head + every BatchNorm affine until E//2, then every parameter (for E < 5 the
official per-epoch rule has no BN stage, see :func:`hierarchical_epochs`); BN stays in train mode throughout (so
its running statistics follow the new task even while the backbone is frozen). Xconv BN
(``retain.models.xconv_bn``) keeps each task's BN (weight, bias, variance) and conv-input means and, when an old
task is evaluated, recomputes that task's BN means through the current convs. Nothing is frozen for good.

On several processes BN must see the global batch, as in the paper: on CUDA (NCCL) the backbone's BatchNorm2d
layers become ``SyncBatchNorm`` at ``setup``; elsewhere (gloo: torch's SyncBatchNorm needs CUDA) each process
normalises its own slice and ``setup`` says so in one warning. The Xconv input trackers are all-reduced either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import convert_sync_batchnorm
from torch import nn

from retain import distributed
from retain.data.scenarios import Scenario, Task
from retain.methods.base import ContinualModel, Method, MethodConfig, Prediction, Stage, register_method
from retain.models.continual import head_prefix
from retain.models.xconv_bn import XconvBN, is_batchnorm2d

__all__ = ["ConFiTConfig", "ConFiT", "hierarchical_epochs", "sync_batchnorm"]


def hierarchical_epochs(epochs: int) -> tuple[int, int, int]:
    """Epochs of the ``head``, ``head+bn`` and ``all`` stages for E = ``epochs``, as the official code gives them.

    The paper code (JieShibo/ConFiT ``main.py:78-90``) sets the trainable parameters at the start of each epoch:
    ``if epoch == 0: fc only / elif epoch == E // 5: + BN / elif epoch == E // 2: all``. For E >= 5 that is
    (E//5, E//2 - E//5, E - E//2). For E < 5, E//5 = 0 so the ``epoch == 0`` branch shadows the BN switch: no
    BN stage, the head alone for E//2 epochs, then all; for E = 1 (E//2 = 0 too) only the head trains, for 1 epoch.
    """
    # a switch due at epoch 0 never happens: that epoch always takes the head-only branch
    bn_start = epochs // 5 or epochs // 2 or epochs  # first epoch that trains more than the head
    all_start = epochs // 2 or epochs  # first epoch that trains everything
    return bn_start, all_start - bn_start, epochs - all_start


def sync_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d under ``module`` by a ``SyncBatchNorm`` holding the same parameters and buffers
    (timm's converter: a BatchNormAct2d keeps its activation); names and state_dict keys are unchanged. Returns
    how many were replaced (0 when there are none left)."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, convert_sync_batchnorm(child))
                replaced += 1
    return replaced


def _per_process_notice(train_cfg: Any) -> str:
    """The one line rank 0 prints when BN cannot be synchronised over this run's processes."""
    plan = distributed.batch_plan(train_cfg)
    return (f"confit on {plan['processes']} processes without CUDA/NCCL: torch's SyncBatchNorm needs CUDA, so each "
            f"process's BatchNorm uses the statistics of its own {plan['per_process_batch']} of the "
            f"{plan['global_batch']} images of a batch, not the paper's (the Xconv input trackers are global); run "
            "one process, or CUDA GPUs, for the paper's BatchNorm")  # fmt: skip


@dataclass
class ConFiTConfig(MethodConfig):
    """Both flags off is plain fine-tuning (with one head per task), the same as method ``finetune``."""

    name: str = "confit"
    hierarchical: bool = True  # head -> + BN affine -> all (hierarchical_epochs); False: all for E epochs
    xconv_bn: bool = True  # per-task BN snapshots, old tasks' BN means recovered through the current convs
    tracker_momentum: float = 0.1  # EMA momentum of the conv-input mean trackers (BN's default)


@register_method
class ConFiT(Method):
    """Hierarchical fine-tuning with Xconv BN; the optimiser, learning rate and epochs E come from ``train``.

    The paper trains with plain SGD (lr 0.01, no momentum, no weight decay): the engine's fresh optimiser per
    stage is then the same as one optimiser per task. Presets set ``train.momentum: 0.0``.
    """

    config_class = ConFiTConfig
    task_aware_predict = True  # an old task is evaluated with its own BN state

    def __init__(self, cfg: ConFiTConfig, model: ContinualModel, scenario: Scenario, train_cfg: Any) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        self.xbn: XconvBN | None = None
        if cfg.xconv_bn:
            if hasattr(model, "xbn"):
                raise ValueError("this model already carries Xconv BN trackers (model.xbn); build a fresh model")
            self.xbn = XconvBN(model.backbone, scenario.n_tasks, cfg.tracker_momentum)
            model.add_module("xbn", self.xbn)  # buffers in the model's state_dict: checkpoints and resume keep them
        self._loaded: int | None = None  # old task whose BN state the backbone holds; None: the current task's

    # ---- what is trained ------------------------------------------------------------------------------------------
    def head_prefixes(self, task: Task) -> list[str]:
        """The task's own head in task-IL (a shared head sliced to the task); the seen heads otherwise."""
        return [head_prefix(task.index)] if self.scenario.protocol == "task_il" else self.seen_heads(task)

    def bn_prefixes(self) -> list[str]:
        """Parameter prefixes of every BatchNorm2d (or SyncBatchNorm) of the backbone: their affine weight and bias."""
        return [f"backbone.{n}." for n, m in self.model.backbone.named_modules() if is_batchnorm2d(m)]

    def trainable_prefixes(self, task: Task) -> list[str]:
        return ["backbone.", *self.head_prefixes(task)]

    def stages(self, task: Task) -> list[Stage]:
        """The official per-epoch trainable sets as stages (empty ones dropped: E < 5 has no ``head+bn``).

        Each stage gets a fresh optimiser; with plain SGD without momentum that equals the paper's one per task.
        """
        epochs = self.train_cfg.epochs
        head, everything = self.head_prefixes(task), self.trainable_prefixes(task)
        if not self.cfg.hierarchical:
            return [Stage("all", epochs, everything)]
        n_head, n_bn, n_all = hierarchical_epochs(epochs)
        stages = [
            Stage("head", n_head, head),
            Stage("head+bn", n_bn, head + self.bn_prefixes()),
            Stage("all", n_all, everything),
        ]
        return [s for s in stages if s.epochs > 0]  # the official per-epoch rule, run-length encoded

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """On several processes: BatchNorm2d -> SyncBatchNorm where supported (CUDA, NCCL), else one warning."""
        super().setup()
        if not distributed.active() or not any(is_batchnorm2d(m) for m in self.model.backbone.modules()):
            return
        if distributed.sync_batchnorm_supported(self.device):
            sync_batchnorm(self.model.backbone)
        elif distributed.is_main():
            warnings.warn(_per_process_notice(self.train_cfg), stacklevel=2)

    def before_task(self, task: Task) -> None:
        self.route(None)  # train on from the previous task's state, whatever was evaluated last
        super().before_task(task)
        self._loaded = None

    def after_task(self, task: Task) -> None:
        if self.xbn is not None:
            self.xbn.snapshot(self.model.backbone, task.index)
        self._loaded = None

    @contextmanager
    def deployed(self) -> Iterator[None]:
        """Evaluation routes each task to its own BN state; on exit the current task's is back in the backbone."""
        try:
            yield
        finally:
            self.route(None)

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self._loaded = None  # a checkpoint holds the current task's state (checkpoint_state)

    def route(self, task_id: int | None) -> None:
        """Put task ``task_id``'s BN state in the backbone: an old task's is restored and its means recovered
        through the current convs; ``None`` (or the current or a later task) gives the current task's state."""
        if self.xbn is None or self.task is None:
            return
        current = self.task.index
        target = None if task_id is None or task_id >= current else task_id
        if target == self._loaded:
            return
        if self._loaded is None:  # leaving the current state: keep it, whatever ran since after_task
            self.xbn.snapshot(self.model.backbone, current)
        self.xbn.restore(self.model.backbone, current if target is None else target, recover=target is not None)
        self._loaded = target

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits with task ``task_id``'s BN statistics (the current task's when ``task_id`` is None)."""
        self.route(task_id)
        return Prediction(self.model(x))  # (B, C)

    # ---- storage --------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The model with the current task's BN state, also while an old task's is routed in (from its snapshot)."""
        state = super().checkpoint_state()
        if self._loaded is not None:
            state |= self.xbn.restored_state(self.task.index)
        return state

    def task_state(self, task: Task) -> dict[str, torch.Tensor]:
        """The task's head rows plus, with Xconv BN, its BN snapshot and input means (ResNet-18: 25,740 values)."""
        state = super().task_state(task)
        if self.xbn is not None:
            state |= {f"xbn.{k}": v for k, v in self.xbn.task_state(task.index).items()}
        return state
