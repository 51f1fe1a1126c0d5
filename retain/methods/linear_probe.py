"""Linear probe: the backbone stays frozen; only the head is trained, on features computed once per task.

The features of each task's training images (test-time transform, no augmentation) go through the frozen backbone
once and are cached as a tensor dataset, so every epoch costs only the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retain.data.scenarios import Task
from retain.methods.base import Method, MethodConfig, Stage, register_method

__all__ = ["LinearProbeConfig", "LinearProbe"]


@dataclass
class LinearProbeConfig(MethodConfig):
    name: str = "linear_probe"


@register_method
class LinearProbe(Method):
    config_class = LinearProbeConfig

    def trainable_prefixes(self, task: Task) -> list[str]:
        return self.seen_heads(task)

    def stages(self, task: Task) -> list[Stage]:
        cached = lambda: self.extract_features(task.train_eval)  # noqa: E731  (built when the stage starts)
        return [Stage("head", self.train_cfg.epochs, self.trainable_prefixes(task), data=cached)]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        feats, y = batch
        logits = self.mask_logits(self.model.head(feats))  # (B, C)
        return {"ce": self.ce(logits, y)}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if k.startswith("head.")}
