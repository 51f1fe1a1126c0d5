"""Tests for retain.metrics against hand-computed accuracy matrices (A[t, i]: task i after training task t)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retain.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    class_weighted_accuracy,
    forgetting,
    forgetting_per_task,
    forgetting_step_drop,
    summarize,
    task_id_accuracy,
)

NAN = math.nan

# Worked example of docs/metrics.md. Task 0 *recovers* after task 2 (88 > 84 > 81), so the two forgetting
# definitions differ on it.
A_DOC = [
    [81.0, None, None],
    [84.0, 90.0, None],
    [88.0, 60.0, 95.0],
]

# Monotone forgetting (the metrics.json example): both forgetting definitions agree.
A_MONO = np.array(
    [
        [98.0, NAN, NAN],
        [60.0, 97.0, NAN],
        [40.0, 55.0, 96.0],
    ]
)


def test_average_accuracy() -> None:
    # (88 + 60 + 95) / 3 = 243 / 3 = 81
    assert average_accuracy(A_DOC) == pytest.approx(81.0)
    # (40 + 55 + 96) / 3 = 191 / 3
    assert average_accuracy(A_MONO) == pytest.approx(191.0 / 3)


def test_average_incremental_accuracy() -> None:
    # row means over seen tasks: 81, (84 + 90) / 2 = 87, 243 / 3 = 81 -> (81 + 87 + 81) / 3 = 83
    assert average_incremental_accuracy(A_DOC) == pytest.approx(83.0)
    # 98, (60 + 97) / 2 = 78.5, 191 / 3 -> (98 + 78.5 + 191 / 3) / 3
    assert average_incremental_accuracy(A_MONO) == pytest.approx((98.0 + 78.5 + 191.0 / 3) / 3)


def test_forgetting_max_upto() -> None:
    # task 0: max(81, 84, 88) - 88 = 0; task 1: max(90, 60) - 60 = 30 -> mean 15
    assert forgetting_per_task(A_DOC, "max_upto") == pytest.approx([0.0, 30.0])
    assert forgetting(A_DOC) == pytest.approx(15.0)
    assert forgetting(A_DOC, "max_upto") == pytest.approx(15.0)


def test_forgetting_max_before_differs() -> None:
    # task 0: max(81, 84) - 88 = -4 (last row excluded from the max); task 1: max(90) - 60 = 30 -> mean 13
    assert forgetting_per_task(A_DOC, "max_before") == pytest.approx([-4.0, 30.0])
    assert forgetting(A_DOC, "max_before") == pytest.approx(13.0)
    assert forgetting(A_DOC, "max_before") != pytest.approx(forgetting(A_DOC, "max_upto"))


def test_forgetting_definitions_agree_on_monotone_matrix() -> None:
    # task 0: 98 - 40 = 58; task 1: 97 - 55 = 42 -> mean 50 (the max is never in the last row)
    for definition in ("max_upto", "max_before"):
        assert forgetting_per_task(A_MONO, definition) == pytest.approx([58.0, 42.0])
        assert forgetting(A_MONO, definition) == pytest.approx(50.0)


def test_forgetting_max_over_intermediate_rows() -> None:
    # 4 tasks; task 0 peaks after task 1 (not on the diagonal).
    A = [
        [70.0, None, None, None],
        [80.0, 90.0, None, None],
        [75.0, 85.0, 88.0, None],
        [60.0, 86.0, 80.0, 92.0],
    ]
    # max_upto:   task 0: 80 - 60 = 20; task 1: 90 - 86 = 4; task 2: 88 - 80 = 8 -> 32 / 3
    assert forgetting_per_task(A, "max_upto") == pytest.approx([20.0, 4.0, 8.0])
    assert forgetting(A) == pytest.approx(32.0 / 3)
    # max_before: same maxima (none in the last row)
    assert forgetting(A, "max_before") == pytest.approx(32.0 / 3)
    # BWT: (60 - 70) + (86 - 90) + (80 - 88) = -10 - 4 - 8 = -22 -> -22 / 3
    assert backward_transfer(A) == pytest.approx(-22.0 / 3)


def test_forgetting_unknown_definition() -> None:
    with pytest.raises(ValueError, match="max_upto.*max_before"):
        forgetting(A_DOC, "average")
    with pytest.raises(ValueError, match="unknown forgetting definition"):
        forgetting_per_task(A_DOC, "nope")


def test_forgetting_step_drop_is_codas_mean_of_step_to_step_drops() -> None:
    # step 1: 81 - 84 = -3; step 2: ((84 - 88) + (90 - 60)) / 2 = 13; mean over the 2 steps: 5
    assert forgetting_step_drop(A_DOC) == pytest.approx(5.0)
    # step 1: 90 - 70 = 20; step 2: ((70 - 50) + (80 - 60)) / 2 = 20
    assert forgetting_step_drop([[90.0, None, None], [70.0, 80.0, None], [50.0, 60.0, 99.0]]) == pytest.approx(20.0)
    assert forgetting_step_drop([[77.0]]) == 0.0


def test_backward_transfer() -> None:
    # ((88 - 81) + (60 - 90)) / 2 = (7 - 30) / 2 = -11.5
    assert backward_transfer(A_DOC) == pytest.approx(-11.5)
    # ((40 - 98) + (55 - 97)) / 2 = (-58 - 42) / 2 = -50
    assert backward_transfer(A_MONO) == pytest.approx(-50.0)


def test_single_task() -> None:
    A = [[77.0]]
    assert average_accuracy(A) == pytest.approx(77.0)
    assert average_incremental_accuracy(A) == pytest.approx(77.0)
    assert forgetting(A) == 0.0
    assert forgetting(A, "max_before") == 0.0
    assert forgetting_per_task(A) == []
    assert backward_transfer(A) == 0.0


def test_input_types_give_python_floats() -> None:
    as_numpy = np.array([[81.0, NAN, NAN], [84.0, 90.0, NAN], [88.0, 60.0, 95.0]])
    as_torch = torch.tensor(as_numpy, dtype=torch.float32)
    as_object = np.array(A_DOC, dtype=object)
    for A in (A_DOC, as_numpy, as_torch, as_object):
        s = summarize(A)
        assert all(type(v) is float for v in s.values())
        assert s["average_accuracy"] == pytest.approx(81.0)
        assert s["forgetting"] == pytest.approx(15.0)
        assert s["forgetting_max_before"] == pytest.approx(13.0)
    # Unused upper-triangle entries may hold anything finite, too.
    assert average_incremental_accuracy([[81, 0, 0], [84, 90, 0], [88, 60, 95]]) == pytest.approx(83.0)


def test_summarize() -> None:
    s = summarize(A_DOC)
    assert s == pytest.approx(
        {
            "average_accuracy": 81.0,
            "average_incremental_accuracy": 83.0,
            "forgetting": 15.0,
            "forgetting_max_before": 13.0,
            "forgetting_step_drop": 5.0,
            "backward_transfer": -11.5,
        }
    )
    assert "task_id_accuracy" not in s
    # task-id accuracy: mean of the given values, None ignored: (80 + 70) / 2 = 75
    assert summarize(A_DOC, task_id_acc=[None, 80.0, 70.0])["task_id_accuracy"] == pytest.approx(75.0)
    assert "task_id_accuracy" not in summarize(A_DOC, task_id_acc=[None, None, None])


@pytest.mark.parametrize(
    ("A", "match"),
    [
        ([], "empty"),
        ([[]], "empty"),
        ([[1.0, 2.0]], "square"),
        (np.zeros((2, 3)), "square"),
        (np.zeros(3), "square"),
        ([[1.0, None], [None, 2.0]], r"A\[1, 0\]"),
        ([[NAN]], r"A\[0, 0\]"),
        ([[1.0], [2.0, 3.0]], "square"),
        ([["a", "b"], ["c", "d"]], "could not convert"),
    ],
)
def test_invalid_matrix(A: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        average_accuracy(A)


def test_class_weighted_accuracy() -> None:
    # tasks with 90/100 and 10/20 correct: weighted (90 + 10) / 120 = 83.33 %, unweighted mean would be 70 %
    assert class_weighted_accuracy([90, 10], [100, 20]) == pytest.approx(100.0 * 100 / 120)
    assert class_weighted_accuracy(torch.tensor([5, 5]), np.array([10, 10])) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="length"):
        class_weighted_accuracy([1, 2], [3])
    with pytest.raises(ValueError, match="zero"):
        class_weighted_accuracy([0], [0])
    with pytest.raises(ValueError):
        class_weighted_accuracy([5], [4])


def test_task_id_accuracy() -> None:
    # 3 of 4 right -> 75 %
    assert task_id_accuracy([0, 1, 2, 2], [0, 1, 2, 1]) == pytest.approx(75.0)
    assert task_id_accuracy(torch.tensor([1, 1]), torch.tensor([1, 1])) == pytest.approx(100.0)
    assert type(task_id_accuracy(np.array([0]), np.array([1]))) is float
    with pytest.raises(ValueError, match="length"):
        task_id_accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        task_id_accuracy([], [])
