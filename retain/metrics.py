"""Continual-learning metrics computed from an accuracy matrix.

Convention: ``A[t, i]`` is the accuracy on task ``i`` measured after training task ``t``. The matrix is ``T x T``;
entries above the diagonal (``i > t``) are unused and may be NaN. Values are returned in whatever unit is given
(the library stores percent). See ``docs/metrics.md`` for the formulas and their sources.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "FORGETTING_DEFINITIONS",
    "forgetting_step_drop",
    "as_accuracy_matrix",
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "class_weighted_accuracy",
    "forgetting",
    "forgetting_per_task",
    "summarize",
    "task_id_accuracy",
    "STORAGE_RULES",
    "storage_rule",
]

FORGETTING_DEFINITIONS: tuple[str, ...] = ("max_upto", "max_before")

# ``bytes_per_task``: the bytes a deployment must keep to serve a task beyond what it would keep without the task.
# Which tensors those are depends on how tasks are deployed (docs/metrics.md, "Storage per task").
STORAGE_RULES: dict[str, str] = {
    "stream": "one model serves the stream: tensors every task shares and overwrites belong to the model, per-task "
    "tensors (heads, rows, adapters, blocks, snapshots) to their task",
    "deployment": "one task per deployment (fine-tuning protocol): everything the task changed in the deployed model",
}


def storage_rule(protocol: str) -> str:
    """The ``STORAGE_RULES`` key of a protocol: ``deployment`` for ``finetune``, ``stream`` otherwise."""
    return "deployment" if protocol == "finetune" else "stream"


def _to_numpy(x: Any) -> np.ndarray:
    """Converts a numpy array, torch tensor or (nested) list with ``None`` entries to a float64 array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().double().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype != object:
            return x.astype(np.float64)
        x = x.tolist()

    def _clean(v: Any) -> Any:
        if v is None:
            return math.nan
        if isinstance(v, (list, tuple)):
            return [_clean(u) for u in v]
        return v

    return np.asarray(_clean(x), dtype=np.float64)


def as_accuracy_matrix(A: Any) -> np.ndarray:
    """Validates an accuracy matrix and returns it as a float64 ``T x T`` numpy array.

    Args:
        A: Accuracy matrix as numpy array, torch tensor or nested list (``None`` is read as NaN).

    Returns:
        The matrix as ``np.ndarray``; entries above the diagonal are left untouched.

    Raises:
        ValueError: If the matrix is empty, not square, or has a NaN/inf in a used entry (``i <= t``).
    """
    try:
        m = _to_numpy(A)
    except (TypeError, ValueError) as e:
        raise ValueError(f"accuracy matrix must be a square T x T array of numbers; could not convert it: {e}") from e
    if m.size == 0:
        raise ValueError("accuracy matrix is empty; expected a square T x T array with T >= 1")
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(
            f"accuracy matrix must be square T x T (A[t, i]: accuracy on task i after task t); got shape {m.shape}"
        )
    lower = m[np.tril_indices(m.shape[0])]
    if not np.all(np.isfinite(lower)):
        bad_idx = np.argwhere(~np.isfinite(m) & np.tri(m.shape[0], dtype=bool))
        bad = ", ".join(f"A[{t}, {i}]" for t, i in bad_idx.tolist())
        raise ValueError(f"accuracy matrix has NaN/inf in used entries (i <= t): {bad}")
    return m


def average_accuracy(A: Any) -> float:
    """Mean accuracy over all ``T`` tasks after training the last task: ``mean_i A[T-1, i]``."""
    m = as_accuracy_matrix(A)
    return float(np.mean(m[-1, :]))


def average_incremental_accuracy(A: Any) -> float:
    """Mean over steps ``t`` of the average accuracy over the tasks seen so far (Rebuffi et al., iCaRL)."""
    m = as_accuracy_matrix(A)
    return float(np.mean([np.mean(m[t, : t + 1]) for t in range(m.shape[0])]))


def _check_definition(definition: str) -> None:
    if definition not in FORGETTING_DEFINITIONS:
        raise ValueError(
            f"unknown forgetting definition {definition!r}; expected one of: 'max_upto' (max over t in [i, T-1], "
            "DualPrompt/LN-tuning) or 'max_before' (max over t in [i, T-2], FACIL)"
        )


def forgetting_per_task(A: Any, definition: str = "max_upto") -> list[float]:
    """Per-task forgetting for tasks ``i = 0 .. T-2``.

    Args:
        A: Accuracy matrix (``A[t, i]`` = accuracy on task i after task t).
        definition: ``"max_upto"``: ``max_{i <= t <= T-1} A[t, i] - A[T-1, i]`` (DualPrompt / LN-tuning code;
            never negative). ``"max_before"``: ``max_{i <= t < T-1} A[t, i] - A[T-1, i]`` (FACIL; can be negative).

    Returns:
        List of ``T - 1`` floats (empty for ``T == 1``).
    """
    _check_definition(definition)
    m = as_accuracy_matrix(A)
    last = m.shape[0] - 1
    stop = last + 1 if definition == "max_upto" else last
    return [float(np.max(m[i:stop, i]) - m[last, i]) for i in range(last)]


def forgetting(A: Any, definition: str = "max_upto") -> float:
    """Average forgetting over tasks ``0 .. T-2``; ``0.0`` for ``T == 1``. See :func:`forgetting_per_task`."""
    per_task = forgetting_per_task(A, definition)
    return float(np.mean(per_task)) if per_task else 0.0


def forgetting_step_drop(A: Any) -> float:
    """CODA-Prompt's forgetting (Smith et al., CVPR 2023, ``utils/calc_forgetting.py``; PROMPTS.md §1.6): the mean over
    steps ``t = 1 .. T-1`` of the mean drop of the earlier tasks from step ``t-1`` to ``t``,
    ``1/(T-1) * sum_t 1/t * sum_{i<t} (A[t-1, i] - A[t, i])``; 0.0 for ``T == 1``. Usually smaller than the max-based
    definitions; do not mix them in one table."""
    m = as_accuracy_matrix(A)
    steps = [np.mean(m[t - 1, :t] - m[t, :t]) for t in range(1, m.shape[0])]
    return float(np.mean(steps)) if steps else 0.0


def backward_transfer(A: Any) -> float:
    """Backward transfer ``1/(T-1) * sum_{i<T-1} (A[T-1, i] - A[i, i])`` (Lopez-Paz & Ranzato, GEM); 0.0 if T == 1."""
    m = as_accuracy_matrix(A)
    last = m.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([m[last, i] - m[i, i] for i in range(last)]))


def class_weighted_accuracy(correct_per_task: Any, count_per_task: Any) -> float:
    """Sample-weighted accuracy in percent: ``100 * sum(correct) / sum(count)`` over the given tasks.

    Unlike :func:`average_accuracy` (an unweighted mean over tasks) every sample counts equally.

    Args:
        correct_per_task: Number of correctly classified samples per task.
        count_per_task: Number of evaluated samples per task.

    Raises:
        ValueError: On length mismatch, empty input, negative counts, or zero total samples.
    """
    correct = _to_numpy(correct_per_task).reshape(-1)
    count = _to_numpy(count_per_task).reshape(-1)
    if correct.shape != count.shape:
        raise ValueError(f"correct_per_task and count_per_task differ in length: {correct.size} vs {count.size}")
    if count.size == 0:
        raise ValueError("class_weighted_accuracy needs at least one task")
    if not (np.all(np.isfinite(correct)) and np.all(np.isfinite(count))):
        raise ValueError("correct_per_task and count_per_task must not contain NaN/None")
    if np.any(count < 0) or np.any(correct < 0) or np.any(correct > count):
        raise ValueError("expected 0 <= correct <= count for every task")
    total = float(count.sum())
    if total <= 0:
        raise ValueError("class_weighted_accuracy: total sample count is zero")
    return float(100.0 * correct.sum() / total)


def task_id_accuracy(pred_task_ids: Any, true_task_ids: Any) -> float:
    """Percentage of samples whose predicted task id equals the true task id.

    Args:
        pred_task_ids: Predicted task ids (array, tensor or list).
        true_task_ids: Ground-truth task ids, same length.

    Raises:
        ValueError: On length mismatch or empty input.
    """
    pred = _to_numpy(pred_task_ids).reshape(-1)
    true = _to_numpy(true_task_ids).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"pred_task_ids and true_task_ids differ in length: {pred.size} vs {true.size}")
    if pred.size == 0:
        raise ValueError("task_id_accuracy needs at least one sample")
    return float(100.0 * np.mean(pred == true))


def summarize(A: Any, task_id_acc: Sequence[float | None] | None = None) -> dict[str, float]:
    """All scalar metrics of an accuracy matrix by name.

    Args:
        A: Accuracy matrix (``A[t, i]`` = accuracy on task i after task t).
        task_id_acc: Optional per-step task-id accuracies; ``None`` entries are ignored. When given (and not all
            ``None``), their mean is reported as ``task_id_accuracy``.

    Returns:
        Dict with ``average_accuracy``, ``average_incremental_accuracy``, ``forgetting`` (max_upto: L2P,
        DualPrompt, LN tuning), ``forgetting_max_before`` (FACIL), ``forgetting_step_drop`` (CODA-Prompt),
        ``backward_transfer`` and optionally ``task_id_accuracy``.
    """
    m = as_accuracy_matrix(A)
    out = {
        "average_accuracy": average_accuracy(m),
        "average_incremental_accuracy": average_incremental_accuracy(m),
        "forgetting": forgetting(m, "max_upto"),
        "forgetting_max_before": forgetting(m, "max_before"),
        "forgetting_step_drop": forgetting_step_drop(m),
        "backward_transfer": backward_transfer(m),
    }
    if task_id_acc is not None:
        vals = _to_numpy(task_id_acc).reshape(-1)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            out["task_id_accuracy"] = float(np.mean(vals))
    return out
