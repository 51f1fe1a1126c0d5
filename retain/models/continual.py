"""``ContinualModel``: a backbone with timm's surface (no classifier) and one linear head per task."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ContinualModel", "head_prefix"]


def head_prefix(task: int) -> str:
    """Name prefix of task ``task``'s head parameters in a ``ContinualModel`` (``head.heads.<task>.``)."""
    return f"head.heads.{task}."


class ContinualModel(nn.Module):
    """A backbone (``forward_features`` / ``forward_head(pre_logits=True)``) followed by task heads.

    Methods add their own modules and parameters to it (LN tables, Xconv BN trackers, a throwaway head), so one
    ``state_dict`` holds everything a checkpoint needs; parameters are selected for training by name pattern
    (``retain.models.adapters.mark_trainable``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def set_seen(self, n_tasks: int) -> None:
        """Let the head predict the classes of tasks 0..n_tasks-1 (the others' logits are -inf)."""
        self.head.n_active = n_tasks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, C)
