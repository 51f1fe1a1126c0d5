"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models", IJCV 2024).

No training at all: the backbone stays frozen and each class is represented by the mean of its training
features (its prototype); prediction is the cosine similarity to the prototypes of the classes seen so far.
Prototypes are stored as the (normalised) weights of the task's head, so checkpoints need nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retain.data.scenarios import Task
from retain.methods.base import Method, MethodConfig, Prediction, Stage, register_method
from retain.models.continual import head_prefix

__all__ = ["SimpleCILConfig", "SimpleCIL", "class_prototypes"]


@dataclass
class SimpleCILConfig(MethodConfig):
    name: str = "simplecil"


def class_prototypes(feats: torch.Tensor, labels: torch.Tensor, classes: range) -> torch.Tensor:
    """(len(classes), D) mean feature of each class in ``classes``."""
    return torch.stack([feats[labels == c].mean(dim=0) for c in classes])


@register_method
class SimpleCIL(Method):
    config_class = SimpleCILConfig

    def trainable_prefixes(self, task: Task) -> list[str]:
        return [head_prefix(task.index)]  # written in closed form (prototypes), never by gradient

    def stages(self, task: Task) -> list[Stage]:
        return []

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        feats, labels = self.extract_features(task.train_eval).tensors
        protos = F.normalize(class_prototypes(feats, labels, task.labels), dim=1)  # (n_t, D)
        head = self.model.head.heads[task.index]
        head.weight.copy_(protos.to(head.weight))
        head.bias.zero_()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        return Prediction(self.model.head(F.normalize(self.model.features(x), dim=1)))  # cosine similarities (B, C)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if k.startswith("head.")}
