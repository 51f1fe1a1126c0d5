"""``train.compile``: ``torch.compile`` of the backbone's ``forward_features``, once per run.

What is compiled is the part every task runs unchanged: ``ContinualModel.features`` calls one compiled function of
(backbone, images), so the training passes, the evaluation passes and a frozen copy (LwF's teacher) share its
graphs; a new task, stage or head does not recompile it (only what its guards see changes: grad mode, train/eval,
which parameters train, a last smaller batch). Methods that change the backbone per task (per-task routing) or hook
inside it (PAD's attention records) say so (``Method.compile_blocker``) and run uncompiled, with one log line.

If torch gives up on a function anyway (``torch._dynamo`` reached its recompile limit: it then runs uncompiled),
:func:`watch_compilation` logs it once per function instead of letting it pass silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["OPTIONS", "enable_compile", "watch_compilation", "compilations"]

OPTIONS: dict[str, Any] = {}  # extra torch.compile arguments (tests: {"backend": "eager"})
_BASELINE = {"graphs": 0}  # torch's graph counter when the current run's compilation was enabled


def _forward_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return backbone.forward_features(x)


def enable_compile(method: Any, log: Callable[[str], None]) -> bool:
    """Compile ``method.model``'s ``forward_features`` for this run; False (with one log line) when the method
    changes or hooks the backbone per task. Resets torch's compile caches (a fresh recompile budget per run)."""
    reason = method.compile_blocker
    if reason is not None:
        log(f"[compile] train.compile: {method.name} runs uncompiled: {reason}")
        return False
    torch.compiler.reset()
    _BASELINE["graphs"] = _graphs()
    method.model.compiled_features = torch.compile(_forward_features, **OPTIONS)  # copies of the model share it
    return True


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compilations() -> int:
    """Graphs torch has compiled since the last run enabled compilation (``torch._dynamo``'s counter)."""
    return _graphs() - _BASELINE["graphs"]


class _LimitHandler(logging.Handler):
    """Relays torch's 'hit config.recompile_limit' warning as one line of the run's log per function."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.log, self.seen = log, set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "recompile_limit" not in text and "cache_size_limit" not in text:
            return
        lines = [line.strip() for line in text.splitlines()]
        where = next((line.removeprefix("function:").strip() for line in lines if line.startswith("function:")), "")
        if where in self.seen:
            return
        self.seen.add(where)
        limit = torch._dynamo.config.recompile_limit
        self.log(f"[compile] torch.compile stopped compiling {where or 'a function'} after {limit} recompilations; "
                 "it runs uncompiled from here (set TORCH_LOGS=recompiles to see why)")  # fmt: skip


@contextmanager
def watch_compilation(log: Callable[[str], None]) -> Iterator[None]:
    """While inside, torch abandoning compilation of a function is logged (once per function)."""
    logger = logging.getLogger("torch._dynamo")
    handler = _LimitHandler(log)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
