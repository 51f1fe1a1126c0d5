"""Joint (cumulative) training: at task t the model trains on the data of tasks 0..t together.

The upper bound of a continual-learning table (it breaks the no-old-data rule). Training continues from the
previous task's weights ("cumulative" in Avalanche's terms, FACIL's ``joint``), so every row of the accuracy matrix
is filled; the last row is the joint upper bound on all tasks. Class-IL: CE over all seen classes, all seen heads
trained. Task-IL: each sample's CE is over its own task's classes (``Method.mask_logits`` with the labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retain.config import ConfigError
from retain.data.scenarios import Task
from retain.methods.base import MethodConfig, Stage, register_method
from retain.methods.finetune import Finetune

__all__ = ["JointConfig", "Joint"]


@dataclass
class JointConfig(MethodConfig):
    name: str = "joint"


@register_method
class Joint(Finetune):
    config_class = JointConfig

    def __init__(self, cfg: JointConfig, *args: Any, **kwargs: Any) -> None:
        if cfg.train_mask == "current":
            raise ConfigError("method.train_mask=current with joint: old tasks' samples would have no target logit "
                              "and old heads would be frozen; use seen or all")  # fmt: skip
        super().__init__(cfg, *args, **kwargs)

    def stages(self, task: Task) -> list[Stage]:
        """Finetune's stage on the training images of tasks 0..t (validated on task t's validation split)."""
        (stage,) = super().stages(task)
        stage.data, stage.validate = (lambda: self.scenario.union_train(task.index)), True
        return [stage]
