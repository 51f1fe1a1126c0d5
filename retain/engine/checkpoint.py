"""Mid-task checkpoints: the method's tensors, the stage loop's state and the run's step count, written as safetensors
plus a JSON manifest (nothing pickled) at epoch ends, every ``run.checkpoint_every`` and on Ctrl-C; read back by
``--resume``.

A save writes ``checkpoints/midtask_<step>_<nonce>.safetensors`` (temporary file, fsync, rename), then replaces
``checkpoints/midtask.json`` (the same way), then deletes the previous tensor file: a crash at any point leaves the
manifest naming a complete tensor file.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from retain import distributed
from retain.config import RunConfig, checkpoint_interval
from retain.engine.context import NonFiniteLoss, RunContext, RunError, RunInterrupted
from retain.engine.rundir import fsync_path
from retain.engine.stages import StageLoop
from retain.methods.base import Method

__all__ = ["MANIFEST", "MidTask", "Checkpointer", "pack", "unpack", "write_midtask", "read_midtask",
           "clear_midtask", "stop_on_interrupt"]  # fmt: skip

MANIFEST = "checkpoints/midtask.json"
FORMAT = "retain-midtask-v1"


# ---- nested states <-> JSON + named tensors ----------------------------------------------------------------------
def pack(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` (dicts, lists, tuples, numbers, strings, tensors, NumPy arrays) as JSON; tensors and arrays go into
    ``tensors`` under their path and are referenced by it."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()  # own storage: safetensors refuses shared ones
        return {"$tensor": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).reshape(-1).view(np.uint8).copy())
        return {"$ndarray": path, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, tuple):
        return {"$tuple": [pack(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: pack(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"$items": [[pack(k, f"{path}/{i}k", tensors), pack(v, f"{path}/{i}", tensors)]
                           for i, (k, v) in enumerate(obj.items())]}  # fmt: skip
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$ndarray" in obj:
        raw = tensors[obj["$ndarray"]].numpy()
        return raw.view(np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "$tuple" in obj:
        return tuple(unpack(v, tensors) for v in obj["$tuple"])
    if "$items" in obj:
        return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["$items"]}
    return {k: unpack(v, tensors) for k, v in obj.items()}


# ---- files -------------------------------------------------------------------------------------------------------
@dataclass
class MidTask:
    """A mid-task checkpoint read back: where the run stood and what it held."""

    task: int
    stage: int
    step: int  # optimiser steps of the whole run (``RunContext.step``)
    task_seconds: float  # training time of the task so far
    loop: dict[str, Any]  # ``StageLoop.state_dict()``
    method: dict[str, torch.Tensor]  # ``Method.checkpoint_state()``
    where: str  # for messages: "task 2, stage 'train', epoch 3, batch 4 (step 40)"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_midtask(run_path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` then the manifest pointing at them (see the module docstring); RunError if the disk refuses,
    with the previous checkpoint left as it was."""
    folder = run_path / "checkpoints"
    name = f"midtask_{manifest['step']:09d}_{secrets.token_hex(3)}.safetensors"
    tmp, final = folder / f".{name}.tmp", folder / name
    written = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        fsync_path(tmp)
        os.replace(tmp, final)
        _write_json(run_path / MANIFEST, manifest | {"tensors": name, "bytes": final.stat().st_size})
        written = True
    except OSError as e:
        raise RunError(f"could not write a checkpoint in {folder}: {e.strerror or e}; the previous checkpoint is "
                       "kept: free disk space, then continue with --resume") from None  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)
        if not written:
            final.unlink(missing_ok=True)
    _remove_stale(folder, keep=name)


def _remove_stale(folder: Path, keep: str | None = None) -> None:
    """Older tensor files and temporary files a killed save left behind."""
    for old in [*folder.glob("midtask_*.safetensors"), *folder.glob(".midtask_*.tmp")]:
        if old.name != keep:
            old.unlink(missing_ok=True)


def read_midtask(run_path: Path, log: Callable[[str], None] = print) -> MidTask | None:
    """The run's mid-task checkpoint, or None when there is none or its tensor file is not complete."""
    path = run_path / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise RunError(f"{path} is not a retain mid-task checkpoint ({manifest.get('format')!r}); delete it to "
                       "resume from the last finished task")  # fmt: skip
    tensor_path = path.parent / manifest["tensors"]
    if not tensor_path.exists() or tensor_path.stat().st_size != manifest["bytes"]:
        log(f"[resume] ignoring {path}: its tensor file {tensor_path.name} is missing or incomplete")
        return None
    tensors = load_file(str(tensor_path))
    method = {k.removeprefix("method/"): v for k, v in tensors.items() if k.startswith("method/")}
    return MidTask(manifest["task"], manifest["stage"], manifest["step"], manifest["task_seconds"],
                   unpack(manifest["loop"], tensors), method, manifest["where"])  # fmt: skip


def clear_midtask(run_path: Path) -> None:
    """Drop the mid-task checkpoint once its task is saved as finished (manifest first: never a dangling one)."""
    if not distributed.is_main():  # rank 0 owns the files
        return
    (run_path / MANIFEST).unlink(missing_ok=True)
    _remove_stale(run_path / "checkpoints")


def _where(loop: StageLoop, step: int) -> str:
    pos = loop.pos
    at = f"after epoch {pos.epoch}" if pos.batch == 0 and pos.epoch else f"epoch {pos.epoch + 1}, batch {pos.batch}"
    return f"task {pos.task}, stage {loop.stage.name!r}, {at} (step {step})"


# ---- when to save ------------------------------------------------------------------------------------------------
class Checkpointer:
    """Saves mid-task checkpoints from a stage loop's ``after_step`` / ``after_epoch`` hooks when due, and on a
    stop request (Ctrl-C), after which it raises :class:`RunInterrupted`."""

    def __init__(self, cfg: RunConfig, run_path: Path, method: Method, ctx: RunContext) -> None:
        self.enabled = cfg.checkpoint
        steps, seconds, epochs = checkpoint_interval(cfg.run.checkpoint_every) if cfg.checkpoint else (None,) * 3
        self.steps, self.seconds, self.epochs = steps, seconds, bool(epochs)
        self.run_path, self.method, self.ctx = run_path, method, ctx
        self.task_start = time.perf_counter()
        self.last_save = time.monotonic()
        self.saved: str | None = None  # where the newest checkpoint stands, for messages
        self.stop_requested = False

    def stop_agreed(self) -> bool:
        """Whether to stop now. Under several processes a Ctrl-C seen by any of them counts for all (a 1-value
        all-reduce), so every process stops at the same step instead of waiting in a collective."""
        if distributed.active():
            flag = distributed.all_reduce_sum(torch.tensor([float(self.stop_requested)]))
            self.stop_requested = bool(flag.item() > 0)
        return self.stop_requested

    def after_step(self, loop: StageLoop) -> None:
        agree = not distributed.active() or loop.sync_due  # several processes agree at the loop's sync steps
        if agree and self.stop_agreed():
            self.stop(loop)
        if self.epochs and loop.pos.batch >= loop.steps_per_epoch:
            return  # the epoch-end save follows
        by_steps = self.steps is not None and self.ctx.step % self.steps == 0
        by_time = self.seconds is not None and time.monotonic() - self.last_save >= self.seconds
        if by_steps or by_time:
            self.save(loop)

    def after_epoch(self, loop: StageLoop) -> None:
        if self.epochs:
            self.save(loop)
        if self.stop_agreed():
            self.stop(loop)

    def stop(self, loop: StageLoop) -> None:
        where = _where(loop, self.ctx.step)
        if self.saved != where:
            self.save(loop)
        raise RunInterrupted(f"stopped at {where}; checkpoint saved in {self.run_path / MANIFEST}")

    def save(self, loop: StageLoop) -> None:
        """Write the method's tensors and ``loop``'s state (refused when a weight is no longer finite)."""
        if not self.enabled:
            return
        loop.sync()  # a non-finite loss since the last read stops the run here: nothing after it is saved
        state = self.method.checkpoint_state()
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        where = _where(loop, self.ctx.step)
        if bad:
            raise NonFiniteLoss(f"{bad[0]} is no longer finite at {where}; nothing was saved after that")
        if distributed.is_main():  # every process holds the same state; rank 0 writes it
            tensors = {f"method/{k}": v.detach().cpu().contiguous().clone() for k, v in state.items()}
            manifest = {"format": FORMAT, "task": loop.task.index, "stage": loop.pos.stage, "step": self.ctx.step,
                        "task_seconds": time.perf_counter() - self.task_start, "where": where,
                        "loop": pack(loop.state_dict(), "loop", tensors)}  # fmt: skip
            write_midtask(self.run_path, manifest, tensors)
        self.saved, self.last_save = where, time.monotonic()


@contextmanager
def stop_on_interrupt(checkpointer: Checkpointer) -> Iterator[None]:
    """While inside, the first Ctrl-C asks ``checkpointer`` to save and stop at the next step; a second one (or one
    when checkpoints are off) stops at once. Only in the main thread (signals cannot be caught elsewhere)."""
    if threading.current_thread() is not threading.main_thread() or not checkpointer.enabled:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if checkpointer.stop_requested:
            raise KeyboardInterrupt
        checkpointer.stop_requested = True
        if distributed.is_main():  # torchrun sends every process the signal; one line is enough
            print("retain: Ctrl-C: saving a checkpoint at the next step, then stopping (Ctrl-C again: stop now)",
                  file=sys.stderr, flush=True)  # fmt: skip

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
