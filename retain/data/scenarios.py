"""Scenarios: one spec for class-incremental, task-incremental and single-task fine-tuning.

Label remapping (explicit): the class order is a permutation of the dataset's class ids; a sample of original
class ``c`` gets label ``class_order.index(c)``. Task t therefore owns the contiguous labels
``[offset_t, offset_t + n_t)`` and heads concatenate in task order.

Class order, by ``ScenarioConfig``: an explicit ``class_order`` list; else ``order_seed=None`` for the natural
order; else ``order_rng="python"`` (``random.seed(s); random.shuffle(list(range(C)))``, LN tuning / DualPrompt)
or ``order_rng="torch"`` (``torch.manual_seed(s); torch.randperm(C)``, Avalanche / ConFiT).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from retain.config import ConfigError, ScenarioConfig

__all__ = ["Task", "Scenario", "RemappedSubset", "make_class_order", "task_sizes", "create_scenario"]

PROTOCOLS = ("class_il", "task_il", "finetune")


class RemappedSubset(Dataset):
    """``base[indices[j]]`` with its label mapped through ``label_map`` (original id -> scenario label)."""

    def __init__(self, base: Dataset, indices: np.ndarray, label_map: np.ndarray) -> None:
        self.base, self.indices, self.label_map = base, np.asarray(indices, dtype=np.int64), label_map
        self.targets = label_map[np.asarray(base.targets)[self.indices]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        x, _ = self.base[int(self.indices[j])]
        return x, int(self.targets[j])


@dataclass
class Task:
    """One step of the stream: its classes (original ids, in order) and its remapped train/val/test sets."""

    index: int
    classes: list[int]
    offset: int
    train: Dataset
    test: Dataset
    train_eval: Dataset  # train images with the deterministic test transform (feature caching, key fitting)
    val: Dataset | None = None  # held out of train (scenario.val_fraction), test transform; None: no validation

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> range:
        return range(self.offset, self.offset + self.n_classes)


@dataclass
class Scenario:
    protocol: str
    tasks: list[Task]
    class_order: list[int]
    class_names: list[str] = field(default_factory=list)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return sum(t.n_classes for t in self.tasks)

    @property
    def classes_per_task(self) -> list[int]:
        return [t.n_classes for t in self.tasks]

    def seen_classes(self, t: int) -> int:
        """Number of labels owned by tasks 0..t."""
        return self.tasks[t].offset + self.tasks[t].n_classes

    def task_of_label(self) -> torch.Tensor:
        """(C,) task index of every scenario label."""
        return torch.cat([torch.full((t.n_classes,), t.index) for t in self.tasks])

    def union_train(self, upto: int) -> Dataset:
        """Training data of tasks 0..upto together (joint / cumulative training)."""
        return ConcatDataset([t.train for t in self.tasks[: upto + 1]])


def make_class_order(n_classes: int, cfg: ScenarioConfig) -> list[int]:
    """The class order a scenario config asks for (see the module docstring)."""
    if cfg.class_order is not None:
        order = list(cfg.class_order)
        if len(set(order)) != len(order) or not all(0 <= c < n_classes for c in order):
            raise ConfigError(f"scenario.class_order must list distinct class ids in 0..{n_classes - 1} (all of them, "
                              "or a subset: the scenario then uses only those classes)")  # fmt: skip
        return list(cfg.class_order)
    if cfg.order_seed is None:
        return list(range(n_classes))
    if cfg.order_rng == "python":
        order = list(range(n_classes))
        random.Random(cfg.order_seed).shuffle(order)  # same stream as random.seed(s); random.shuffle(order)
        return order
    if cfg.order_rng == "torch":
        gen = torch.Generator().manual_seed(cfg.order_seed)  # same stream as torch.manual_seed(s)
        return torch.randperm(n_classes, generator=gen).tolist()
    raise ConfigError(f"scenario.order_rng={cfg.order_rng!r}; valid: python, torch")


def task_sizes(n_classes: int, cfg: ScenarioConfig) -> list[int]:
    """Classes per task: an optional larger first task, then equal tasks (or chunks of ``classes_per_task``)."""
    if cfg.protocol == "finetune":
        return [n_classes]
    first = cfg.first_task_classes
    rest = n_classes - (first or 0)
    n_rest = cfg.n_tasks - (1 if first else 0)
    if cfg.classes_per_task:
        k = cfg.classes_per_task
        sizes = [k] * (rest // k) + ([rest % k] if rest % k else [])
    else:
        if n_rest <= 0 or rest % n_rest:
            raise ConfigError(
                f"{n_classes} classes do not split into scenario.n_tasks={cfg.n_tasks}"
                f"{f' after a first task of {first}' if first else ''}; choose a divisor or set "
                "scenario.classes_per_task (the last task then holds the remainder)"
            )
        sizes = [rest // n_rest] * n_rest
    sizes = ([first] if first else []) + sizes
    if len(sizes) != cfg.n_tasks:
        raise ConfigError(f"this split gives {len(sizes)} tasks but scenario.n_tasks={cfg.n_tasks}; make them agree")
    return sizes


def _fraction(indices: np.ndarray, targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded per-class fraction of ``indices`` (at least one sample per class)."""
    if fraction >= 1.0:
        return indices
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets[indices]):
        idx = indices[targets[indices] == c]
        keep.append(rng.choice(idx, size=max(1, round(len(idx) * fraction)), replace=False))
    return np.sort(np.concatenate(keep))


def _holdout(indices: np.ndarray, targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held out): a seeded per-class ``round(n * fraction)``, at least 1 and at most
    ``n - 1`` for a class with ``n >= 2`` samples, none for a class of one (FACIL's per-class validation split)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(targets[indices]):
        idx = indices[targets[indices] == c]
        k = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        held.append(rng.choice(idx, size=k, replace=False))
    held = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    return indices[~np.isin(indices, held)], held


def create_scenario(train_set: Dataset, test_set: Dataset, cfg: ScenarioConfig, train_eval_set: Dataset | None = None,
                    seed: int = 0) -> Scenario:  # fmt: skip
    """Split ``train_set``/``test_set`` (same classes; ``targets`` attribute) into tasks.

    Args:
        train_eval_set: the train images with the test transform; defaults to ``train_set``.
        seed: for ``train_fraction``/``test_fraction`` subsampling and the ``val_fraction`` hold-out only.

    With ``cfg.val_fraction > 0`` each task's ``val`` holds that seeded per-class fraction of its train samples
    (after ``train_fraction``; seed ``seed + 2000 + t``) over ``train_eval_set``, removed from ``train`` and
    ``train_eval`` (FACIL, Masana et al. TPAMI 2022: 0.1); otherwise ``val`` is None.
    """
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"scenario.protocol={cfg.protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"scenario.val_fraction={cfg.val_fraction}; use a value in [0, 1) (FACIL: 0.1)")
    n_classes = len(train_set.classes)
    order = make_class_order(n_classes, cfg)  # may be a subset of the classes (FACIL's imagenet_32_reduced)
    sizes = task_sizes(len(order), cfg)
    if cfg.use_tasks is not None:
        sizes = sizes[: cfg.use_tasks]
    label_map = np.full(n_classes, -1, dtype=np.int64)  # classes outside the order never enter a task
    label_map[np.asarray(order)] = np.arange(len(order))
    y_train, y_test = np.asarray(train_set.targets), np.asarray(test_set.targets)
    train_eval_set = train_set if train_eval_set is None else train_eval_set
    tasks, offset = [], 0
    for t, size in enumerate(sizes):
        classes = order[offset : offset + size]
        tr = _fraction(np.flatnonzero(np.isin(y_train, classes)), y_train, cfg.train_fraction, seed + t)
        te = _fraction(np.flatnonzero(np.isin(y_test, classes)), y_test, cfg.test_fraction, seed + 1000 + t)
        va = None
        if cfg.val_fraction > 0:
            tr, va = _holdout(tr, y_train, cfg.val_fraction, seed + 2000 + t)
        tasks.append(
            Task(
                t,
                classes,
                offset,
                RemappedSubset(train_set, tr, label_map),
                RemappedSubset(test_set, te, label_map),
                RemappedSubset(train_eval_set, tr, label_map),
                None if va is None else RemappedSubset(train_eval_set, va, label_map),
            )  # fmt: skip
        )
        offset += size
    names = [train_set.classes[c] for c in order[:offset]]
    return Scenario(cfg.protocol, tasks, order[:offset], names)
