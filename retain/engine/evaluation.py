"""Evaluation: every accuracy view that applies to the protocol, task-id accuracy and the retention k-NN probe,
from one call after each task."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from retain import distributed
from retain.data.scenarios import Scenario, Task
from retain.engine.context import RunContext
from retain.features import extract_features_to_main, weighted_knn_accuracy
from retain.methods.base import Method

__all__ = ["Evaluation", "VIEWS", "primary_view", "evaluate", "retention_accuracy"]

# protocol -> accuracy views it reports; the first is the primary one (``accuracy_matrix`` in metrics.json)
VIEWS = {
    "class_il": ("class_il",),  # argmax over every class seen so far
    "task_il": ("taw", "tag"),  # task-aware: argmax within the task's classes | task-agnostic: over all seen heads
    "finetune": ("class_il",),
}


def primary_view(protocol: str) -> str:
    return VIEWS[protocol][0]


@dataclass
class Evaluation:
    """Accuracy (%) on tasks 0..upto by view name, task-id accuracy and its counts (row: the images of task i,
    column: the task id the method chose for them), retention k-NN accuracy, and seconds taken."""

    protocol: str
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    task_id: float | None = None
    task_id_counts: list[list[int]] | None = None  # (upto + 1, n_tasks)
    retention: float | None = None
    seconds: float = 0.0

    @property
    def primary(self) -> list[float]:
        return self.accuracy[primary_view(self.protocol)]


class _Counts:
    """Correct / total per view for one task, and task-id hits over the whole evaluation."""

    def __init__(self, n_tasks: int = 0) -> None:
        self.correct: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.chosen = torch.zeros(n_tasks, n_tasks, dtype=torch.int64)  # (T, T) true task x chosen task id

    def add_task_ids(self, chosen: torch.Tensor, true: torch.Tensor) -> None:
        """Count the task ids ``chosen`` (B,) for images of tasks ``true`` (B,), and the hits."""
        self.add("task_id", chosen, true)
        T = len(self.chosen)
        pairs = true.long() * T + chosen.long().clamp(0, T - 1)  # (B,)
        self.chosen += torch.bincount(pairs, minlength=T * T).view(T, T).cpu()  # (T, T)

    def add(self, view: str, pred: torch.Tensor, y: torch.Tensor) -> None:
        self.correct[view] = self.correct.get(view, 0) + (pred == y).sum().item()
        self.total[view] = self.total.get(view, 0) + len(y)

    def reduce(self, views: tuple[str, ...]) -> _Counts:
        """Sum ``views``' counts over the processes (each evaluated its shard); a view no shard saw stays absent."""
        if not distributed.active():
            return self
        both = torch.tensor([[self.correct.get(v, 0), self.total.get(v, 0)] for v in views], dtype=torch.int64)
        for v, (c, t) in zip(views, distributed.all_reduce_sum(both).tolist(), strict=True):  # (V, 2)
            if t:
                self.correct[v], self.total[v] = c, t
        return self

    def percent(self, view: str) -> float:
        return 100.0 * self.correct.get(view, 0) / max(self.total.get(view, 0), 1)


@torch.no_grad()
def _evaluate_task(method: Method, task: Task, n_seen: int, protocol: str, ctx: RunContext,
                   task_of: torch.Tensor, tid: _Counts) -> _Counts:  # fmt: skip
    """One pass over ``task.test`` (two for task-IL when ``predict`` depends on the task id)."""
    counts = _Counts()
    lo, hi = task.offset, task.offset + task.n_classes
    task_il = protocol == "task_il"
    separate_tag = task_il and method.task_aware_predict
    for x, y in ctx.eval_loader(task.test):
        x, y = x.to(ctx.device), y.to(ctx.device)
        with ctx.autocast:
            pred = method.predict(x, task.index if task_il else None)
        logits, task_pred = pred.logits.float(), pred.task_ids  # (B, C), (B,) or None
        if task_il:
            counts.add("taw", logits[:, lo:hi].argmax(1) + lo, y)
        if not separate_tag:
            counts.add("tag" if task_il else "class_il", logits[:, :n_seen].argmax(1), y)
            if task_pred is not None:
                tid.add_task_ids(task_pred, task_of[y])
    if separate_tag:  # the task-agnostic view needs the prediction made without the task id
        for x, y in ctx.eval_loader(task.test):
            x, y = x.to(ctx.device), y.to(ctx.device)
            with ctx.autocast:
                pred = method.predict(x, None)
            logits, task_pred = pred.logits.float(), pred.task_ids
            counts.add("tag", logits[:, :n_seen].argmax(1), y)
            if task_pred is not None:
                tid.add_task_ids(task_pred, task_of[y])
    return counts


@torch.no_grad()
def evaluate(method: Method, scenario: Scenario, upto: int, ctx: RunContext,
             retention: tuple[Dataset, Dataset] | None = None, k: int = 20,
             temperature: float = 0.07) -> Evaluation:  # fmt: skip
    """Every view on tasks 0..upto after training task ``upto``; retention k-NN when ``retention`` is given.

    Runs inside ``method.deployed()``; extra passes use the engine's loaders (``method.bind(ctx)``).
    """
    start = time.perf_counter()
    method.bind(ctx)
    with method.deployed():
        result = _evaluate(method, scenario, upto, ctx)
        if retention is not None:
            result.retention = retention_accuracy(method, retention, k, temperature)
    result.seconds = time.perf_counter() - start
    return result


def _evaluate(method: Method, scenario: Scenario, upto: int, ctx: RunContext) -> Evaluation:
    method.model.eval()
    n_seen = scenario.seen_classes(upto)
    task_of = scenario.task_of_label().to(ctx.device)
    result = Evaluation(scenario.protocol, {v: [] for v in VIEWS[scenario.protocol]})
    tid = _Counts(len(scenario.tasks))
    for task in scenario.tasks[: upto + 1]:
        counts = _evaluate_task(method, task, n_seen, scenario.protocol, ctx, task_of, tid)
        counts.reduce(VIEWS[scenario.protocol])  # every process evaluated its shard
        for view, accs in result.accuracy.items():
            accs.append(counts.percent(view))
    tid.reduce(("task_id",))
    if tid.total:
        result.task_id = tid.percent("task_id")
        result.task_id_counts = distributed.all_reduce_sum(tid.chosen)[: upto + 1].tolist()  # (upto + 1, T)
    return result


@torch.no_grad()
def retention_accuracy(method: Method, sets: tuple[Dataset, Dataset], k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN accuracy on the retention dataset of the features the method deploys (``method.features``).

    The feature pass runs under the run's autocast (``ctx.autocast``; none on the CPU), each process over its shard;
    rank 0 gathers the features on its device and runs the k-NN there; every process returns rank 0's accuracy.
    """
    train, test = (_retention_features(method, data) for data in sets)
    acc = torch.zeros((), dtype=torch.float64)
    if train is not None:  # rank 0
        acc.fill_(weighted_knn_accuracy(*train, *test, k=k, temperature=temperature, in_place=True))
    return float(distributed.broadcast_from_main(acc))


def _retention_features(method: Method, data: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``method.extract_features(data, forward=method.features)`` under autocast, gathered to rank 0 alone."""
    was_training = method.model.training
    method.model.eval()
    autocast = method.ctx.autocast if method.ctx is not None else nullcontext()
    out = extract_features_to_main(method.features, method.loader(data), method.device, autocast)
    method.model.train(was_training)
    return out
