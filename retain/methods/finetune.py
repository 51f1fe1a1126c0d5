"""Fine-tuning baseline: every backbone weight and the head are trained on each task in turn, no regularisation.

The lower bound of every continual-learning table: it shows how much a method saves from catastrophic forgetting.
"""

from __future__ import annotations

from dataclasses import dataclass

from retain.data.scenarios import Task
from retain.methods.base import Method, MethodConfig, register_method

__all__ = ["FinetuneConfig", "Finetune"]


@dataclass
class FinetuneConfig(MethodConfig):
    name: str = "finetune"


@register_method
class Finetune(Method):
    config_class = FinetuneConfig

    def trainable_prefixes(self, task: Task) -> list[str]:
        return ["backbone.", *self.seen_heads(task)]
