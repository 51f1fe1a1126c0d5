"""Batches that do not depend on how they are loaded: the same samples, augmented the same way, whatever the number
of dataloader workers or processes, and a resume that skips finished batches without reading them.

- :class:`EpochBatches` draws one epoch's order from the stage's generator (the same draws the earlier
  ``DataLoader(shuffle=True)`` + progress bar made, so batch orders did not move) and gives every sample of the epoch
  its own augmentation seed, a hash of (epoch seed, sample index); the epoch seed comes from the generator, which the
  engine seeds per (run seed, task, stage). A resume at batch k starts the epoch's iteration at k: indices only.
- :class:`SeededSamples` reads ``data[i]`` with the CPU generator seeded from that sample's seed and restores it, so
  a transform's random draws (torchvision's transforms draw from torch's global RNG) come from the sample, not from
  whichever process or worker loads it, and the training process's own RNG (dropout) is untouched.
- :func:`auto_workers` is ``train.num_workers: auto``.

Not covered: a custom transform that draws from Python's ``random`` or NumPy's global RNG (torchvision's do not).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from retain import distributed

__all__ = ["EpochBatches", "InOrderBatches", "SeededSamples", "auto_workers", "cpus_available", "load_seconds",
           "sample_seed"]  # fmt: skip

_MASK = (1 << 64) - 1


def sample_seed(epoch_seed: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in the epoch of ``epoch_seed``: splitmix64 of both, in [0, 2^63)."""
    z = (epoch_seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) >> 1


def _draw(generator: torch.Generator | None = None) -> int:
    """One int64 from ``generator`` (the global RNG when None), as ``DataLoader`` draws its base seed."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class SeededSamples(Dataset):
    """``data`` read by ``(index, seed)`` keys: ``data[index]`` under a CPU generator seeded with ``seed``; the
    generator's state before the read is restored after it."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.data[index]
        finally:
            generator.set_state(state)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Shuffled global batches of ``n`` samples from ``generator``, this process's contiguous slice of each
    (``distributed.shard_bounds``), every sample keyed ``(index, seed)`` for :class:`SeededSamples`.

    Each iteration is one epoch: two int64 draws (the first is the epoch's augmentation seed) and two permutations
    (the first is the order).
    ``skip(k)`` makes the next iteration start at global batch k without touching the k batches before it. A last
    batch with fewer samples than processes cannot give each one a sample and is dropped (on every process).
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool, generator: torch.Generator, processes: int = 1,
                 rank: int = 0) -> None:  # fmt: skip
        self.n, self.batch_size, self.drop_last, self.generator = n, batch_size, drop_last, generator
        self.processes, self.rank = processes, rank
        whole, tail = divmod(n, batch_size)
        tail = 0 if drop_last else tail
        self.length = whole + (1 if tail >= processes else 0)
        self._start = 0

    def __len__(self) -> int:
        return self.length

    def skip(self, batches: int) -> None:
        """Start the next epoch at its batch ``batches`` (a resume inside an epoch)."""
        self._start = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start, self._start = self._start, 0
        # the draws of the earlier DataLoader(shuffle=True) behind a progress bar, kept so batch orders stay the same:
        # two base seeds (the first is now the epoch's augmentation seed), the permutation, and the permutation
        # RandomSampler drew for its empty remainder when the epoch ran out
        epoch_seed = _draw(self.generator)
        _draw(self.generator)
        order = torch.randperm(self.n, generator=self.generator).tolist()
        torch.randperm(self.n, generator=self.generator)
        for b in range(start, self.length):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            lo, hi = distributed.shard_bounds(len(batch), self.processes, self.rank)
            yield [(i, sample_seed(epoch_seed, i)) for i in batch[lo:hi]]


class InOrderBatches(Sampler[list[tuple[int, int]]]):
    """In-order batches of ``indices`` for a pass that is not training; the pass's seed is one draw of the global
    RNG at each iteration (where ``DataLoader`` drew its base seed), so an augmented pass (EWC's FACIL Fisher) is
    reproducible and the same whatever loads it."""

    def __init__(self, indices: range, batch_size: int) -> None:
        self.indices, self.batch_size = indices, batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        seed = _draw()
        for lo in range(0, len(self.indices), self.batch_size):
            yield [(i, sample_seed(seed, i)) for i in self.indices[lo : lo + self.batch_size]]


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# starting workers: the first batch of 1-4 forked workers came 0.09-0.32 s after iter() on the 2-core machine
# (docs/performance.md); an epoch that loads faster than this in the training process is loaded there
WORKER_START_S = 0.5


def load_seconds(data: Dataset, probes: int = 4) -> float:
    """Seconds this process takes to read (decode + transform) all of ``data``, from its first ``probes`` samples;
    the CPU generator is restored after the reads (a random transform draws from it)."""
    n = min(probes, len(data))
    if n == 0:
        return 0.0
    state = torch.default_generator.get_state()
    try:
        started = time.perf_counter()
        for i in range(n):
            data[i]
        return (time.perf_counter() - started) / n * len(data)
    finally:
        torch.default_generator.set_state(state)


def auto_workers(data: Dataset, device: torch.device, cap: int = 16) -> int:
    """``train.num_workers: auto``: on a GPU, the CPUs of this process's share of the node (affinity mask / processes
    on the node), one kept for the training process, at most ``cap``; 0 when reading all of ``data`` here takes
    less than starting workers (tiny or in-memory data, :data:`WORKER_START_S`); 0 on a CPU device, where workers
    take cores from the training process's threads (docs/performance.md measures both choices)."""
    if device.type == "cpu":
        return 0
    share = cpus_available() // distributed.local_world_size()
    workers = max(0, min(cap, share - 1))
    if workers and load_seconds(data) < WORKER_START_S:
        return 0
    return workers
