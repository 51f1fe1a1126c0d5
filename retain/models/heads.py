"""Classifier heads for continual learning.

``TaskHeads`` holds one linear layer per task in a ``ModuleList`` and concatenates their logits in task order, so
labels are the positions in the scenario's class order. It serves both protocols:
- class-incremental: logits of tasks not yet seen are masked to -inf (``n_active``);
- task-incremental: the engine slices the logits to the evaluated task (a multi-head == a sliced shared head).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TaskHeads"]


class TaskHeads(nn.Module):
    def __init__(self, num_features: int, classes_per_task: list[int]) -> None:
        super().__init__()
        self.classes_per_task = list(classes_per_task)
        self.heads = nn.ModuleList(nn.Linear(num_features, n) for n in classes_per_task)
        self.n_active = len(classes_per_task)  # tasks whose classes may be predicted

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_task)

    def seen_classes(self) -> int:
        return sum(self.classes_per_task[: self.n_active])

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([h(feats) for h in self.heads], dim=1)  # (B, C)
        n_seen = self.seen_classes()
        if n_seen < logits.shape[1]:
            logits = torch.cat([logits[:, :n_seen], torch.full_like(logits[:, n_seen:], float("-inf"))], dim=1)
        return logits
