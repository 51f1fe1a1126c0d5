"""What a number depends on beyond the config: the CPU, its vector kernels, torch and the GPU (demo, benchmarks)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "machine_info", "machine_line"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model and cores, torch's vector kernels (``cpu_capability``), torch, threads, Python and a GPU if any."""
    import torch

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip


def machine_line() -> str:
    """One line for a summary: ``machine: <cpu>, <cores> cores (<kernels> kernels), torch <version>, Python <version>``
    (+ the GPU); each run's thread count is in its config (``train.threads``)."""
    info = machine_info()
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ""
    kernels = f"{info['cores']} cores ({info['cpu_capability']} kernels)"
    return f"machine: {info['cpu']}, {kernels}, torch {info['torch']}, Python {info['python']}{gpu}"
