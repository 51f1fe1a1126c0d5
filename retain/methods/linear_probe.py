"""Linear probe: the backbone stays frozen; only the head is trained, on features computed once per task.

The features of each task's training images (test-time transform, no augmentation) go through the frozen backbone
once and are cached as a tensor dataset, so every epoch costs only the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from retain.data.scenarios import Task
from retain.methods.base import ContinualModel, Method, MethodConfig, Stage, register_method

__all__ = ["LinearProbeConfig", "LinearProbe", "extract_features"]


@dataclass
class LinearProbeConfig(MethodConfig):
    name: str = "linear_probe"


@torch.no_grad()
def extract_features(model: ContinualModel, data: Dataset, batch_size: int, device: torch.device) -> TensorDataset:
    """(features (N, D), labels (N,)) of ``data`` through the frozen backbone in eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        feats.append(model.features(x.to(device)).float().cpu())  # (B, D)
        labels.append(y)
    model.train(was_training)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


@register_method("linear_probe")
class LinearProbe(Method):
    config_class = LinearProbeConfig

    def trainable_prefixes(self, task: Task) -> list[str]:
        return self.seen_heads(task)

    def stages(self, task: Task) -> list[Stage]:
        cached = extract_features(self.model, task.train_eval, self.train_cfg.eval_batch_size, self.device)
        return [Stage("head", self.train_cfg.epochs, self.trainable_prefixes(task), data=cached)]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        feats, y = batch
        logits = self.mask_logits(self.model.head(feats))  # (B, C)
        return {"ce": F.cross_entropy(logits, y, label_smoothing=self.train_cfg.label_smoothing)}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if k.startswith("head.")}
