"""``ContinualModel``: a backbone with timm's surface (no classifier) and one linear head per task."""

from __future__ import annotations

from collections.abc import Callable

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
        # train.compile: a compiled ``(backbone, x) -> backbone.forward_features(x)`` (retain.engine.compiling)
        self.compiled_features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    def set_seen(self, n_tasks: int) -> None:
        """Let the head predict the classes of tasks 0..n_tasks-1 (the others' logits are -inf)."""
        self.head.n_active = n_tasks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled_features is not None:
            tokens = self.compiled_features(self.backbone, x)  # (B, N, D) or (B, C, H, W)
        else:
            tokens = self.backbone.forward_features(x)
        return self.backbone.forward_head(tokens, pre_logits=True)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, C)
