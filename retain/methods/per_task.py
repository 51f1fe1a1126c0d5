"""The per-task family: methods whose tasks own parameters (LN rows, LoRA matrices, inserted blocks, prompts) that
one routing switch selects by task id.

A subclass does its model surgery in ``__init__``, names what task t owns (``owned(t)``: parameter-name patterns;
``row_tables``: the (T, ...) tables of which task t owns row t) and, if its per-task modules are not switched by a
``set_task`` method, how to route (``route`` / ``routed``). The rest is shared: whether weights are per task or
shared by the stream (``per_task``), the trainable set (owned + own or seen heads), ``task_state``, the checkpoint
(heads + owned), and ``predict`` / ``features`` under the routing switch. ``tests/test_per_task.py`` has a complete
one in 30 lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import ContinualModel, Method, MethodConfig, Prediction
from retain.models.adapters import matches, set_task, use_task
from retain.models.continual import head_prefix

__all__ = ["PerTaskMethod", "resolve_per_task"]


def resolve_per_task(per_task: bool | None, scenario: Scenario, method: str) -> bool:
    """``per_task`` with None resolved by protocol; per-task weights in class-IL would need a task-id predictor."""
    if per_task is None:
        return scenario.protocol != "class_il"
    if per_task and scenario.protocol == "class_il":
        raise ConfigError(f"method.per_task=true needs the task id at test time (scenario.protocol=task_il or "
                          f"finetune); class-IL {method} trains one shared set (method.per_task=false)")  # fmt: skip
    return per_task


class PerTaskMethod(Method):
    """Base of the per-task family; see the module docstring.

    ``per_task``: every task owns its weights, chosen by task id (from ``method.per_task``; None: per task in
    task-IL and fine-tuning, shared in class-IL). ``selects_task``: the method predicts the task id itself (e.g.
    LN tuning's keys), so its weights are per task in every protocol.
    """

    selects_task = False
    row_tables: frozenset[str] = frozenset()  # parameter names of (T, ...) tables: task t owns row t

    def __init__(self, cfg: MethodConfig, model: ContinualModel, scenario: Scenario, train_cfg: Any) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        self.per_task = self.selects_task or resolve_per_task(getattr(cfg, "per_task", None), scenario, self.name)
        self.task_aware_predict = self.per_task
        if self.per_task:
            self.compile_blocker = "each task routes its own weights inside the backbone (a compilation per task)"

    # ---- what a task owns -----------------------------------------------------------------------------------------
    def owned(self, t: int) -> list[str]:
        """Patterns (``adapters.matches``) of the parameters task ``t`` trains besides heads: its own when
        ``per_task``, else the shared ones every task trains in turn."""
        raise NotImplementedError

    def trainable_prefixes(self, task: Task) -> list[str]:
        """What task t trains: ``owned(t)`` and its head (with shared weights and ``train_mask=seen``, the seen
        heads)."""
        own = self.per_task or self.cfg.train_mask == "current"
        heads = [head_prefix(task.index)] if own else self.seen_heads(task)
        return [*self.owned(task.index), *heads]

    def task_state(self, task: Task) -> dict[str, torch.Tensor]:
        """The task's head, and with per-task weights its owned tensors (its row of each row table); shared
        weights belong to the model."""
        state = super().task_state(task)
        if not self.per_task:
            return state
        patterns, t = self.owned(task.index), task.index
        for name, p in self.model.named_parameters():
            if any(matches(name, pat) for pat in patterns):
                state[name] = p[t] if name in self.row_tables else p
        return state

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The heads and what every task owns (the frozen backbone is rebuilt from its weights)."""
        patterns = sorted({p for t in range(self.scenario.n_tasks) for p in self.owned(t)})
        return {k: v for k, v in self.model.state_dict().items()
                if k.startswith("head.") or any(matches(k, p) for p in patterns)}  # fmt: skip

    # ---- routing --------------------------------------------------------------------------------------------------
    def deployed_task(self, task_id: int | None) -> int:
        """The task whose weights serve a prediction: ``task_id`` when given and weights are per task, else the
        latest task's (shared weights: 0)."""
        if task_id is not None and self.per_task:
            return task_id
        return self.task.index if (self.per_task and self.task is not None) else 0

    def training_route(self) -> Any:
        """Where the model is routed between the method's own passes: the current task's weights."""
        return self.deployed_task(None)

    def route(self, task: Any) -> None:
        """The routing switch: from now on every per-task module of the backbone (each submodule with a
        ``set_task`` method) uses ``task``'s weights."""
        set_task(self.model.backbone, task)

    @contextmanager
    def routed(self, task: Any) -> Iterator[None]:
        """``route(task)`` for the duration of a ``with`` block, then the previous routing."""
        with use_task(self.model.backbone, task):
            yield

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.route(self.training_route())

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self.route(self.training_route())

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits with the weights of ``task_id`` (per task; None: the latest task's) or the shared ones."""
        with self.routed(self.deployed_task(task_id)):
            return Prediction(self.model(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features with the latest task's weights (or the shared ones): what the retention k-NN probes."""
        with self.routed(self.deployed_task(None)):
            return self.model.features(x)
