"""``RunContext``: what every part of the loop shares besides the method (device, precision, loaders, logging)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from retain.config import TrainConfig

__all__ = ["RunContext", "RunError", "NonFiniteLoss", "RunInterrupted"]


class RunError(RuntimeError):
    """A run cannot start or continue as asked; the message says why and what to do."""


class NonFiniteLoss(RunError):
    """A loss (or a weight) became NaN or infinite; the message names the step."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on request (Ctrl-C) after saving; the message says where and what was saved."""


@dataclass
class RunContext:
    """Device, precision and logging of a run, and the one place loaders are made (so they can be sharded)."""

    train: TrainConfig
    device: torch.device
    writer: Any = None  # TensorBoard SummaryWriter or None
    step: int = 0  # optimiser steps taken in the whole run (TensorBoard x axis)
    seed: int = 0
    log_every: int = 10
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def autocast(self) -> torch.autocast:
        enabled = self.train.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_loader(self, data: Dataset, batch_size: int, generator: torch.Generator) -> DataLoader:
        """Shuffled batches drawn with ``generator`` (its state at an epoch's start fixes the epoch's order)."""
        drop_last = self.train.drop_last and len(data) >= batch_size
        return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator,
                          num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda")  # fmt: skip

    def eval_loader(self, data: Dataset, batch_size: int | None = None) -> DataLoader:
        """In-order batches for evaluation."""
        gen = torch.Generator().manual_seed(0)
        return DataLoader(data, batch_size=batch_size or self.train.eval_batch_size, shuffle=False, generator=gen,
                          num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda")  # fmt: skip

    def pass_loader(self, data: Dataset, batch_size: int) -> DataLoader:
        """In-order batches for a method's extra pass (Fisher, prototypes, keys, caches): ``Method.loader``."""
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=self.train.num_workers,
                          pin_memory=self.device.type == "cuda")  # fmt: skip
