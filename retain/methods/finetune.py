"""Fine-tuning baseline: every backbone weight and the head are trained on each task in turn, no regularisation.

The lower bound of every continual-learning table: it shows how much a method saves from catastrophic forgetting.
The heads trained follow ``train_mask``: ``seen`` (default; all seen heads, CE over the seen classes: FACIL's
``finetuning --all-outputs``) or ``current`` (the current head only, old heads frozen, CE over the current task's
classes: FACIL's default ``finetuning``, the lower bound its LwF and EWC add one term to).

``trainable_blocks``: None (default) trains the whole backbone; N trains only the last N of the backbone's
``blocks`` (a timm ViT's transformer blocks) and the heads, everything else (patch and position embeddings, the
blocks below, the final norm) frozen: PEFT-ViT's "Top-3" row is ``trainable_blocks: 3`` (preset
``peft_vit/cifar100_top3``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retain.config import ConfigError
from retain.data.scenarios import Task
from retain.methods.base import Method, MethodConfig, register_method
from retain.models.continual import head_prefix

__all__ = ["FinetuneConfig", "Finetune"]


@dataclass
class FinetuneConfig(MethodConfig):
    name: str = "finetune"
    trainable_blocks: int | None = None  # None: the whole backbone; N: only its last N blocks (and the heads)


@register_method
class Finetune(Method):
    config_class = FinetuneConfig

    def __init__(self, cfg: FinetuneConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(cfg, *args, **kwargs)
        n = getattr(cfg, "trainable_blocks", None)  # subclasses (joint) have no such option
        self.backbone_prefixes = ["backbone."]
        if n is not None:
            blocks = getattr(self.model.backbone, "blocks", None)
            if blocks is None:
                raise ConfigError(f"method.trainable_blocks needs a backbone with blocks (a timm ViT), got "
                                  f"{type(self.model.backbone).__name__}")  # fmt: skip
            if not 1 <= n <= len(blocks):
                raise ConfigError(f"method.trainable_blocks={n}: the backbone has {len(blocks)} blocks")
            self.backbone_prefixes = [f"backbone.blocks.{i}." for i in range(len(blocks) - n, len(blocks))]

    def trainable_prefixes(self, task: Task) -> list[str]:
        heads = [head_prefix(task.index)] if self.cfg.train_mask == "current" else self.seen_heads(task)
        return [*self.backbone_prefixes, *heads]
