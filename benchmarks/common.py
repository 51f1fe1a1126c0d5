"""Shared pieces of the benchmark scripts: interleaved timing, the peak memory of a call on CPU, machine facts.

Timing: every variant runs once per round, in an order rotated by one each round (no variant always runs first or
after the same neighbour), after untimed warm-up passes; a comparison is the median over rounds of the per-round
ratio of two variants, so both sides of a ratio always ran side by side under the same machine load.

Memory (Linux): glibc is told to serve every allocation above 64 KiB from its own mapping (``mallopt``), so a freed
tensor leaves the resident set at once; the kernel's resident high-water mark is reset (``/proc/self/clear_refs``)
before the call and read back (``VmHWM``) after it. The peak is that mark minus the resident size before the call:
what the call added at its highest point (activations, gradients, optimiser state, temporaries). On a GPU use
``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from retain.machine import machine_info

__all__ = ["Ratio", "time_interleaved", "median_ratio", "measure", "loss_step", "head_step", "peak_rss",
           "machine_info", "parse_sized"]  # fmt: skip

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MALLOC_READY: bool | None = None


class Ratio(NamedTuple):
    """One comparison: median seconds of the reference and of ours, and the median per-round ratio ref / ours."""

    case: str
    ref: str
    ref_s: float
    ours: str
    ours_s: float
    ratio: float


def time_interleaved(fns: dict[Hashable, Callable[[], object]], rounds: int, warmup: int) -> dict[Hashable, list]:
    """Seconds of each call of each function: ``warmup`` untimed passes, then ``rounds`` rotated rounds."""
    items = list(fns.items())
    for _ in range(warmup):
        for _, fn in items:
            fn()
    times: dict[Hashable, list[float]] = {key: [] for key in fns}
    for r in range(rounds):
        for key, fn in items[r % len(items) :] + items[: r % len(items)]:
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def measure(cases: dict[str, dict[str, Callable[[], object]]], rounds: int, warmup: int) -> list[Ratio]:
    """Each case is ``{reference name: fn, ours name: fn}``; all cases' functions are interleaved in one session."""
    times = time_interleaved({(c, n): fn for c, pair in cases.items() for n, fn in pair.items()}, rounds, warmup)
    rows = []
    for c, pair in cases.items():
        ref, ours = list(pair)
        t_ref, t_ours = times[(c, ref)], times[(c, ours)]
        rows.append(Ratio(c, ref, statistics.median(t_ref), ours, statistics.median(t_ours),
                          median_ratio(t_ref, t_ours)))  # fmt: skip
    return rows


def loss_step(method, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, stage) -> Callable[[], None]:
    """One training step of ``method`` on a fixed batch, as the engine takes it: its loss terms summed,
    backpropagated, ``opt`` stepped."""
    from retain.engine.stages import stage_loss  # (scripts put the checkout on sys.path before importing retain)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sum(stage_loss(method, stage, (x, y)).values()).backward()
        opt.step()

    return step


def head_step(model: torch.nn.Module, head: torch.nn.Linear, opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor) -> Callable[[], None]:  # fmt: skip
    """One plain timm step on a fixed batch: cross-entropy of ``head`` on ``model``'s pooled features."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(model.forward_head(model.forward_features(x), pre_logits=True)), y).backward()
        opt.step()

    return step


def _malloc_ready() -> bool:
    """Fix glibc's mmap threshold at 64 KiB (and trim the heap top) once; False where that or clear_refs fails."""
    global _MALLOC_READY
    if _MALLOC_READY is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024) == 1
            Path("/proc/self/clear_refs").write_text("5")
            _MALLOC_READY = ok and _status_kib("VmHWM") is not None
        except (OSError, AttributeError):
            _MALLOC_READY = False
    return _MALLOC_READY


def _status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_rss(fn: Callable[[], object]) -> int | None:
    """Bytes the resident set grew by at its highest point during ``fn()``; None where it cannot be measured."""
    if not _malloc_ready():
        return None
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident size
    fn()
    return 1024 * max(0, _status_kib("VmHWM") - before)


def parse_sized(parser: argparse.ArgumentParser, argv: list[str] | None, small: dict) -> argparse.Namespace:
    """Parse ``argv``; with ``--small`` the defaults become ``small`` (flags given explicitly still win)."""
    parser.add_argument("--small", action="store_true", help=f"small size (what the suite runs): {small}")
    if parser.parse_known_args(argv)[0].small:
        parser.set_defaults(**small)
    return parser.parse_args(argv)
