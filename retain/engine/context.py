"""``RunContext``: what every part of the loop shares besides the method (device, precision, loaders, logging).

Under several processes (``retain.distributed``) the loaders shard their data: a training batch is the same global
batch as in one process, cut into one contiguous slice per process (:class:`~retain.engine.loading.EpochBatches`);
evaluation and a method's extra passes give each process a contiguous run of whole batches (no padding, no sample
twice), so a sharded pass meets the same batches as the one-process pass and the shards concatenate, in rank order,
to its order. Training and extra passes read every sample under its own augmentation seed
(:mod:`retain.engine.loading`), so neither the number of processes nor of workers changes what a sample looks like.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, Subset

from retain import distributed
from retain.config import TrainConfig
from retain.data.device_resize import collate_native
from retain.engine.loading import EpochBatches, InOrderBatches, SeededSamples, auto_workers

__all__ = ["RunContext", "RunError", "NonFiniteLoss", "RunInterrupted", "whole_batches", "whole_batch_range"]


class RunError(RuntimeError):
    """A run cannot start or continue as asked; the message says why and what to do."""


class NonFiniteLoss(RunError):
    """A loss (or a weight) became NaN or infinite; the message names the step."""


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on request (Ctrl-C) after saving; the message says where and what was saved."""


def whole_batch_range(n: int, batch_size: int) -> range:
    """The indices of this process's contiguous run of whole batches of ``n`` samples (all of them in one process)."""
    if not distributed.active():
        return range(n)
    lo, hi = distributed.shard_bounds(math.ceil(n / batch_size))
    return range(lo * batch_size, min(hi * batch_size, n))


def whole_batches(data: Dataset, batch_size: int) -> Dataset:
    """This process's contiguous run of whole batches of ``data`` (all of it in one process)."""
    if not distributed.active():
        return data
    return Subset(data, whole_batch_range(len(data), batch_size))


def _ignore_ctrl_c(worker_id: int) -> None:
    """In a dataloader worker: a Ctrl-C reaches the whole process group, and the training process alone handles it
    (saves, then stops its workers); a worker that inherited its handler would print its message once more."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    def workers(self, data: Dataset) -> int:
        """``train.num_workers`` for a loader over ``data`` (``auto``: :func:`~retain.engine.loading.auto_workers`)."""
        n = self.train.num_workers
        return auto_workers(data, self.device) if n == "auto" else int(n)

    def _loader(self, data: Dataset, sampler: Any, seeded: bool = False, persistent: bool = False) -> DataLoader:
        """A loader of ``sampler``'s batches of ``data`` (read by ``(index, seed)`` keys through
        :class:`~retain.engine.loading.SeededSamples` when ``seeded``): workers (chosen on ``data`` itself, which
        ``auto`` reads a few samples of), prefetch and pinned memory (on CUDA) as configured; its own generator
        seeds the workers (never the global RNG); batches of native-resolution crops (``data.device_resize``) are
        resized on ``.to(device)``."""
        workers = self.workers(data)
        extra = dict(persistent_workers=persistent and self.train.persistent_workers,
                     prefetch_factor=self.train.prefetch_factor) if workers else {}  # fmt: skip
        data = SeededSamples(data) if seeded else data
        return DataLoader(data, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
                          collate_fn=collate_native, generator=torch.Generator().manual_seed(self.seed),
                          worker_init_fn=_ignore_ctrl_c if workers else None, **extra)  # fmt: skip

    def train_loader(self, data: Dataset, batch_size: int, generator: torch.Generator) -> DataLoader:
        """Shuffled batches drawn with ``generator`` (its state at an epoch's start fixes the epoch's order and
        augmentations); ``loader.batch_sampler.skip(k)`` starts the next epoch at batch k.

        ``batch_size`` is the global batch; under N processes each takes its slice of the same seeded global batch.
        """
        drop_last = self.train.drop_last and len(data) >= batch_size
        batches = EpochBatches(len(data), batch_size, drop_last, generator, distributed.world_size(),
                               distributed.rank())  # fmt: skip
        return self._loader(data, batches, seeded=True, persistent=True)

    def eval_loader(self, data: Dataset, batch_size: int | None = None) -> DataLoader:
        """In-order batches for evaluation (this process's whole batches)."""
        batch_size = batch_size or self.train.eval_batch_size
        data = whole_batches(data, batch_size)
        return self._loader(data, BatchSampler(SequentialSampler(data), batch_size, drop_last=False))

    def pass_loader(self, data: Dataset, batch_size: int) -> DataLoader:
        """In-order batches for a method's extra pass (Fisher, prototypes, keys, caches): ``Method.loader``. Under N
        processes this process's whole batches; whoever reads it reduces or gathers what it computes."""
        return self._loader(data, InOrderBatches(whole_batch_range(len(data), batch_size), batch_size), seeded=True)
