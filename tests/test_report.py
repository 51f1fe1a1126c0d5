"""Tests for retain.report: tables, CSV, plot and the full report written from fake run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from retain.report import (
    format_matrix,
    load_run,
    plot_runs,
    summary_rows,
    to_csv,
    to_markdown,
    write_report,
)


def _write_run(root: Path, name: str, **fields: object) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"run: {name}\n", encoding="utf-8")
    data = {
        "run": name,
        "method": "finetune",
        "backbone": "vit_tiny_patch4_32",
        "dataset": "digits",
        "protocol": "class_il",
        "n_tasks": 3,
        "finished_tasks": 3,
        "accuracy_matrix": [[98.0, None, None], [60.0, 97.0, None], [40.0, 55.0, 96.0]],
        "task_id_accuracy": [None, None, None],
        # Deliberately wrong stored numbers: reports must recompute from the matrix.
        "metrics": {"average_accuracy": 12.3, "forgetting": 45.6},
        "task_time_s": [12.1, 11.9, 12.4],
        "trainable_params": [5000, 5000, 5000],
        "bytes_per_task": [20000, 20000, 20000],
        "total_time_s": 36.4,
    }
    data.update(fields)
    (run_dir / "metrics.json").write_text(json.dumps(data), encoding="utf-8")
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    ft = _write_run(tmp_path / "runs", "demo-finetune")
    # Unfinished 4-task run: 2 finished tasks, stored as a 2 x 4 matrix with task-id predictions.
    pr = _write_run(
        tmp_path / "runs",
        "demo-prompt",
        method="l2p",
        n_tasks=4,
        finished_tasks=2,
        accuracy_matrix=[[90.0, None, None, None], [85.0, 93.0, None, None]],
        task_id_accuracy=[100.0, 80.0, None, None],
        trainable_params=[12000, 1234567],
        bytes_per_task=[4096, 8192],
        total_time_s=None,
        task_time_s=[10.0, 20.5],
    )
    return [ft, pr]


def test_load_run(runs: list[Path], tmp_path: Path) -> None:
    data = load_run(runs[0])
    assert data["method"] == "finetune"
    assert load_run(runs[0] / "metrics.json")["run"] == "demo-finetune"
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_run(missing)


def test_summary_rows_recompute(runs: list[Path]) -> None:
    ft, pr = summary_rows(runs)
    # finetune: avg acc (40 + 55 + 96) / 3 = 63.67; AIA (98 + 78.5 + 63.67) / 3 = 80.06;
    # forgetting ((98 - 40) + (97 - 55)) / 2 = 50; BWT -50
    assert ft["run"] == "demo-finetune"
    assert ft["tasks"] == "3/3"
    assert ft["average_accuracy"] == pytest.approx(191.0 / 3)
    assert ft["average_incremental_accuracy"] == pytest.approx((98.0 + 78.5 + 191.0 / 3) / 3)
    assert ft["forgetting"] == pytest.approx(50.0)
    assert ft["backward_transfer"] == pytest.approx(-50.0)
    assert ft["task_id_accuracy"] == "-"
    assert ft["trainable_params"] == 5000
    assert ft["bytes_per_task"] == pytest.approx(20000.0)
    assert ft["total_time_s"] == pytest.approx(36.4)
    # l2p (2 of 4 tasks): avg acc (85 + 93) / 2 = 89; AIA (90 + 89) / 2 = 89.5; forgetting 90 - 85 = 5; BWT -5
    assert pr["tasks"] == "2/4"
    assert pr["average_accuracy"] == pytest.approx(89.0)
    assert pr["average_incremental_accuracy"] == pytest.approx(89.5)
    assert pr["forgetting"] == pytest.approx(5.0)
    assert pr["backward_transfer"] == pytest.approx(-5.0)
    assert pr["task_id_accuracy"] == pytest.approx(80.0)  # at the last finished step
    assert pr["trainable_params"] == 1234567  # max over tasks
    assert pr["bytes_per_task"] == pytest.approx(6144.0)  # mean
    assert pr["total_time_s"] == pytest.approx(30.5)  # sum of task times when the total is missing


def test_summary_rows_no_finished_tasks(tmp_path: Path) -> None:
    run = _write_run(tmp_path, "fresh", finished_tasks=0, accuracy_matrix=[], task_id_accuracy=[])
    (row,) = summary_rows([run])
    assert row["tasks"] == "0/3"
    assert row["average_accuracy"] == "-"
    assert "| fresh |" in to_markdown([row])


def test_to_markdown(runs: list[Path]) -> None:
    md = to_markdown(summary_rows(runs))
    lines = md.strip().splitlines()
    assert len(lines) == 4  # header, alignment, two runs
    assert lines[0].startswith("| run | method |")
    assert set(lines[1]) <= set("|:-")
    ft, pr = lines[2], lines[3]
    for cell in ("demo-finetune", "finetune", "3/3", "63.7", "80.1", "50.0", "-50.0", "5,000", "19.5 KiB", "36.4"):
        assert f"| {cell} |" in ft, cell
    for cell in ("l2p", "2/4", "89.0", "89.5", "5.0", "-5.0", "80.0", "1,234,567", "6.0 KiB", "30.5"):
        assert f"| {cell} |" in pr, cell
    assert "12.3" not in md and "45.6" not in md  # stored numbers are not trusted


def test_csv_round_trip(runs: list[Path], tmp_path: Path) -> None:
    rows = summary_rows(runs)
    path = to_csv(rows, tmp_path / "out" / "summary.csv")
    with path.open(newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    for orig, read in zip(rows, back, strict=True):
        assert list(read) == list(orig)
        for key, value in orig.items():
            if isinstance(value, float):
                assert float(read[key]) == pytest.approx(value)
            else:
                assert read[key] == str(value)


def test_plot_runs(runs: list[Path], tmp_path: Path) -> None:
    out = plot_runs(runs, tmp_path / "plots" / "acc.png")
    assert out == tmp_path / "plots" / "acc.png"
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_matrix() -> None:
    text = format_matrix([[98.0, None, None], [60.0, 97.0, None], [40.0, 55.0, 96.0]])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split()[-3:] == ["0", "1", "2"]
    assert lines[1].split() == ["task", "0", "98.0", "-", "-"]
    assert lines[2].split() == ["task", "1", "60.0", "97.0", "-"]
    assert lines[3].split() == ["task", "2", "40.0", "55.0", "96.0"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    # Unfinished k x n matrix: unused entries (i > t) print as "-", even when filled in.
    partial = format_matrix([[90.0, 1.0, None, None], [85.0, 93.0, None, None]])
    assert partial.splitlines()[1].split() == ["task", "0", "90.0", "-", "-", "-"]
    assert format_matrix([]) == "(empty accuracy matrix)"


def test_write_report(runs: list[Path], tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    report = write_report(runs, out_dir)
    assert report == out_dir / "report.md"
    text = report.read_text(encoding="utf-8")
    assert "| demo-finetune |" in text and "| 63.7 |" in text
    assert "![accuracy](accuracy.png)" in text
    assert "40.0" in text and "96.0" in text  # matrix of the first run
    assert (out_dir / "summary.csv").is_file()
    assert (out_dir / "accuracy.png").stat().st_size > 1000
