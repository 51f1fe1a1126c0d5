"""Multi-process runs over ``torch.distributed``: one process per GPU (or CPU slot), launched by ``torchrun``.

``torchrun --nproc_per_node N -m retain run PRESET ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT`` (env:// rendezvous; several nodes: ``--nnodes``, ``--node_rank``, ``--rdzv_*``);
:func:`session` joins the process group (NCCL on CUDA, gloo on the CPU) and leaves it. Without those variables (or
with ``WORLD_SIZE=1``) every helper here is a no-op and a run is exactly the one-process run.

The engine uses the rest: rank helpers (only :func:`is_main` writes files), :func:`barrier`, the batch rule
(:func:`batch_plan`), and the reductions a sharded pass needs (:func:`all_reduce_sum`, :func:`gather_rows`,
:func:`shard_bounds`). Gradients are averaged by ``DistributedDataParallel`` (``engine.stages``), not here.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from retain.config import ConfigError, TrainConfig

__all__ = ["session", "active", "rank", "local_rank", "local_world_size", "world_size", "is_main", "barrier",
           "peer_failure", "all_reduce_sum", "gather_rows", "shard_bounds", "broadcast_buffers", "batch_plan",
           "BATCH_SCOPES", "LR_SCALINGS"]  # fmt: skip

BATCH_SCOPES = ("global", "per_process")
LR_SCALINGS = ("none", "linear")


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's global rank (from ``RANK`` before the group is joined or after it is left)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this node (``LOCAL_WORLD_SIZE``, set by torchrun; 1 otherwise)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, metrics, TensorBoard and prints."""
    return rank() == 0


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _use_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@contextmanager
def session(device: str = "auto", timeout_min: float = 30.0) -> Iterator[None]:
    """Join the process group that ``torchrun`` describes in the environment (no-op outside one, or when a group is
    already joined); leave it on a clean exit. A process that fails does not wait for the others: it exits, and
    ``torchrun`` stops the rest."""
    if not _launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    cuda = _use_cuda(device)
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    yield
    dist.barrier()
    dist.destroy_process_group()


def peer_failure(e: BaseException) -> bool:
    """True when ``e`` is a collective that failed because another process stopped or lost its connection (what
    the surviving processes see when one dies: torchrun then stops them and names the one that failed first)."""
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(s in text for s in ("gloo", "NCCL", "Connection"))


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` runs: NCCL needs the process's GPU, gloo the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if t.device.type != "cpu" else t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every process (in place when it lives where the collective runs); ``t`` alone outside a
    group."""
    if not active():
        return t
    work = t.to(_comm_device(t))
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not t:
        t.copy_(work)
    return t


_DTYPES = (torch.float32, torch.int64, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool,
           torch.uint8)  # fmt: skip


def _header(t: torch.Tensor | None, dev: torch.device) -> torch.Tensor:
    """(8,) rows, dtype index, ndim, then up to 5 trailing sizes of ``t``; rows -1 for a process without one."""
    h = torch.full((8,), -1, dtype=torch.int64, device=dev)
    if t is not None:
        h[0], h[1], h[2] = t.shape[0], _DTYPES.index(t.dtype), t.dim()
        h[3 : 2 + t.dim()] = torch.tensor(t.shape[1:], dtype=torch.int64)
    return h


def _shapes(t: torch.Tensor | None, caller: str) -> tuple[torch.device, list[int], torch.dtype, list[int]]:
    """(device of the collective, every process's row count, dtype, trailing shape) of the shards ``t`` (None: an
    empty shard), exchanged in one all-gather of fixed-size headers."""
    dev = _comm_device(t if t is not None else torch.empty(0))
    headers = [torch.empty(8, dtype=torch.int64, device=dev) for _ in range(world_size())]
    dist.all_gather(headers, _header(t, dev))
    given = [h for h in headers if h[0] >= 0]
    if not given:
        raise ValueError(f"{caller}: no process has any rows")
    dtype, ndim = _DTYPES[int(given[0][1])], int(given[0][2])
    trailing = [int(s) for s in given[0][3 : 2 + ndim]]
    return dev, [max(int(h[0]), 0) for h in headers], dtype, trailing


def gather_rows(t: torch.Tensor | None) -> torch.Tensor:
    """Every process's ``t`` (N_r, ...) concatenated in rank order (sum N_r, ...), on every process; the shards may
    have different lengths (they are padded for the collective and cut back), and a process whose shard was empty
    may pass None (dtype and trailing shape come from the others). In one process: ``t``."""
    if not active():
        return t
    dev, rows, dtype, trailing = _shapes(t, "gather_rows")
    padded = torch.zeros((max(rows), *trailing), dtype=dtype, device=dev)  # (longest, ...)
    if t is not None:
        padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])
    return out.to(t.device) if t is not None else out.cpu()


def shard_bounds(n: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
    """[lo, hi) of the ``index``-th of ``parts`` contiguous, near-equal pieces of ``range(n)`` (this process's by
    default); pieces differ in length by at most one and may be empty."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    return n * index // parts, n * (index + 1) // parts


def batch_plan(train: TrainConfig, processes: int | None = None, batch_size: int | None = None,
               label: str = "train.batch_size") -> dict[str, Any]:  # fmt: skip
    """The batch and learning-rate rule of ``train`` on ``processes`` processes (default: this group's size), for
    ``batch_size`` (default ``train.batch_size``; a stage's own batch, named ``label`` in errors).

    ``train.batch_scope``: ``global`` (default): ``train.batch_size`` is the batch of one optimiser step over all
    processes, each takes ``batch_size / N`` samples of it (N must divide it); the lr is unchanged, so the maths does
    not depend on N. ``per_process``: each process takes ``batch_size``; the global batch is ``N * batch_size``.
    ``train.lr_scaling``: ``none`` (default) or ``linear``: lr x N (Goyal et al. 2017), only with ``per_process``.
    """
    n = world_size() if processes is None else processes
    if train.batch_scope not in BATCH_SCOPES:
        raise ConfigError(f"train.batch_scope={train.batch_scope!r}; valid: {', '.join(BATCH_SCOPES)}")
    if train.lr_scaling not in LR_SCALINGS:
        raise ConfigError(f"train.lr_scaling={train.lr_scaling!r}; valid: {', '.join(LR_SCALINGS)}")
    if train.lr_scaling == "linear" and train.batch_scope == "global":
        raise ConfigError("train.lr_scaling=linear scales the lr with the global batch, which "
                          "train.batch_scope=global keeps fixed; set train.batch_scope=per_process or "
                          "train.lr_scaling=none")  # fmt: skip
    size = train.batch_size if batch_size is None else batch_size
    per_process = train.batch_scope == "per_process"
    if not per_process and size % n:
        raise ConfigError(f"{label}={size} (the global batch) does not split over {n} processes; use a multiple of "
                          f"{n}, or train.batch_scope=per_process")  # fmt: skip
    factor = n if train.lr_scaling == "linear" else 1
    return {"processes": n, "batch_scope": train.batch_scope, "global_batch": size * (n if per_process else 1),
            "per_process_batch": size if per_process else size // n, "lr_scaling": train.lr_scaling,
            "lr_factor": factor, "lr": train.lr * factor}  # fmt: skip


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every buffer of ``module`` set to rank 0's (what DDP does before each forward; the engine does it once more
    after a stage's last step, so every process leaves the stage with the state rank 0 checkpoints)."""
    if not active():
        return
    for buf in module.buffers():
        work = buf.to(_comm_device(buf))
        dist.broadcast(work, src=0)
        if work is not buf:
            buf.copy_(work)


__all__ += ["gather_rows_to_main", "broadcast_from_main"]


def gather_rows_to_main(t: torch.Tensor | None) -> torch.Tensor | None:
    """``gather_rows`` to rank 0 alone: every process's ``t`` (N_r, ...) in rank order (sum N_r, ...) on rank 0,
    None on the others. Rank 0 allocates the result once and receives each shard straight into its rows, so no
    process holds more than its shard, and rank 0 the result besides. In one process: ``t``."""
    if not active():
        return t
    dev, rows, dtype, trailing = _shapes(t, "gather_rows_to_main")
    if not is_main():
        if t is not None and len(t):
            dist.send(t.to(dev).contiguous(), dst=0)
        return None
    out = torch.empty((sum(rows), *trailing), dtype=dtype, device=dev)
    lo = 0
    for r, n in enumerate(rows):
        if n and r == 0:
            out[:n].copy_(t)
        elif n:
            dist.recv(out[lo : lo + n], src=r)  # a row slice of a contiguous tensor: received in place
        lo += n
    return out.to(t.device) if t is not None else out


def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    """``t`` set to rank 0's on every process (in place when it lives where the collective runs); ``t`` alone
    outside a group."""
    if not active():
        return t
    work = t.to(_comm_device(t))
    dist.broadcast(work, src=0)
    if work is not t:
        t.copy_(work)
    return t


__all__ += ["sync_batchnorm_supported"]


def sync_batchnorm_supported(device: torch.device | str) -> bool:
    """True in a process group where torch's ``SyncBatchNorm`` can synchronise: CUDA tensors over NCCL (it refuses
    CPU tensors, so gloo on the CPU cannot)."""
    return active() and torch.device(device).type == "cuda" and dist.get_backend() == "nccl"


__all__ += ["one_node", "gather_counts", "broadcast_text"]


def one_node() -> bool:
    """True in a process group whose processes all run on this node (node-local shared memory reaches each one)."""
    return active() and world_size() == local_world_size()


def gather_counts(n: int) -> list[int]:
    """Every process's ``n`` in rank order (``[n]`` outside a group): e.g. shard lengths, whose sums give offsets."""
    if not active():
        return [n]
    dev = _comm_device(torch.empty(0))
    parts = [torch.empty(1, dtype=torch.int64, device=dev) for _ in range(world_size())]
    dist.all_gather(parts, torch.tensor([n], dtype=torch.int64, device=dev))
    return [int(p) for p in parts]


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every process (e.g. a file name it chose); ``text`` alone outside a group."""
    if not active():
        return text
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)  # (bytes,)
    size = int(broadcast_from_main(torch.tensor([len(data)], dtype=torch.int64)))
    if not size:
        return ""
    buf = data if is_main() else torch.empty(size, dtype=torch.uint8)  # (bytes,)
    return bytes(broadcast_from_main(buf).tolist()).decode()
