"""Joint (cumulative) training: at task t the model trains on the data of tasks 0..t together.

The upper bound of a continual-learning table (it breaks the no-old-data rule). Training continues from the
previous task's weights ("cumulative" in Avalanche's terms), so every row of the accuracy matrix is filled; the last
row is the joint upper bound on all tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from retain.data.scenarios import Task
from retain.methods.base import MethodConfig, register_method
from retain.methods.finetune import Finetune

__all__ = ["JointConfig", "Joint"]


@dataclass
class JointConfig(MethodConfig):
    name: str = "joint"


@register_method
class Joint(Finetune):
    config_class = JointConfig

    def train_dataset(self, task: Task) -> Dataset:
        return self.scenario.union_train(task.index)
