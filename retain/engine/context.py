"""``RunContext``: what every part of the loop shares besides the method (device, precision, loaders, logging).

Under several processes (``retain.distributed``) the loaders shard their data: a training batch is the same global
batch as in one process, cut into one contiguous slice per process (:class:`RankSlices`); evaluation and a method's
extra passes give each process a contiguous run of whole batches (no padding, no sample twice), so a sharded pass
meets the same batches as the one-process pass and the shards concatenate, in rank order, to its order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset

from retain import distributed
from retain.config import TrainConfig

__all__ = ["RunContext", "RunError", "NonFiniteLoss", "RunInterrupted", "RankSlices", "whole_batches"]


class RunError(RuntimeError):
    """A run cannot start or continue as asked; the message says why and what to do."""


class NonFiniteLoss(RunError):
    """A loss (or a weight) became NaN or infinite; the message names the step."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on request (Ctrl-C) after saving; the message says where and what was saved."""


class RankSlices(Sampler[list[int]]):
    """This process's slice of every global batch of ``batches``: contiguous, near-equal slices (``shard_bounds``).

    A last batch with fewer samples than processes cannot give each one a sample and is dropped (on every process).
    """

    def __init__(self, batches: BatchSampler, n_samples: int, processes: int, index: int) -> None:
        self.batches, self.processes, self.index = batches, processes, index
        tail = 0 if batches.drop_last else n_samples % batches.batch_size
        self.length = len(batches) - (1 if 0 < tail < processes else 0)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batches):
            if i >= self.length:
                return
            lo, hi = distributed.shard_bounds(len(batch), self.processes, self.index)
            yield batch[lo:hi]


def whole_batches(data: Dataset, batch_size: int) -> Dataset:
    """This process's contiguous run of whole batches of ``data`` (all of it in one process)."""
    if not distributed.active():
        return data
    lo, hi = distributed.shard_bounds(math.ceil(len(data) / batch_size))
    return Subset(data, range(lo * batch_size, min(hi * batch_size, len(data))))


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
        """Shuffled batches drawn with ``generator`` (its state at an epoch's start fixes the epoch's order).

        ``batch_size`` is the global batch; under N processes each takes its slice of the same seeded global batch.
        """
        drop_last = self.train.drop_last and len(data) >= batch_size
        common = dict(num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda", generator=generator)
        if not distributed.active():
            return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=drop_last, **common)
        batches = BatchSampler(RandomSampler(data, generator=generator), batch_size, drop_last)
        slices = RankSlices(batches, len(data), distributed.world_size(), distributed.rank())
        return DataLoader(data, batch_sampler=slices, **common)

    def eval_loader(self, data: Dataset, batch_size: int | None = None) -> DataLoader:
        """In-order batches for evaluation (this process's whole batches)."""
        gen = torch.Generator().manual_seed(0)
        batch_size = batch_size or self.train.eval_batch_size
        return DataLoader(whole_batches(data, batch_size), batch_size=batch_size, shuffle=False, generator=gen,
                          num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda")  # fmt: skip

    def pass_loader(self, data: Dataset, batch_size: int) -> DataLoader:
        """In-order batches for a method's extra pass (Fisher, prototypes, keys, caches): ``Method.loader``. Under N
        processes this process's whole batches; whoever reads it reduces or gathers what it computes."""
        return DataLoader(whole_batches(data, batch_size), batch_size=batch_size, shuffle=False,
                          num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda")  # fmt: skip
