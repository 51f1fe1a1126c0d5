"""Fine-tuning baseline: every backbone weight and the head are trained on each task in turn, no regularisation.

The lower bound of every continual-learning table: it shows how much a method saves from catastrophic forgetting.
The heads trained follow ``train_mask``: ``seen`` (default; all seen heads, CE over the seen classes: FACIL's
``finetuning --all-outputs``) or ``current`` (the current head only, old heads frozen, CE over the current task's
classes: FACIL's default ``finetuning``, the lower bound its LwF and EWC add one term to).
"""

from __future__ import annotations

from dataclasses import dataclass

from retain.data.scenarios import Task
from retain.methods.base import Method, MethodConfig, register_method
from retain.models.continual import head_prefix

__all__ = ["FinetuneConfig", "Finetune"]


@dataclass
class FinetuneConfig(MethodConfig):
    name: str = "finetune"


@register_method
class Finetune(Method):
    config_class = FinetuneConfig

    def trainable_prefixes(self, task: Task) -> list[str]:
        heads = [head_prefix(task.index)] if self.cfg.train_mask == "current" else self.seen_heads(task)
        return ["backbone.", *heads]
