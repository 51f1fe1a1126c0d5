"""Tests for retain.report: tables, CSV, plot and the full report written from fake run directories."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from retain.cli import main
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


# ----------------------------------------------------------------------------------------------- HTML, compare, sweeps


def _seed_pair(root: Path) -> list[Path]:
    """Two runs of one config, seeds 0 and 1: avg acc 77.5 and 79.5 (78.5 ± 1.4); FACIL forgetting -5 and -2."""
    dirs = []
    for seed, A in ((0, [[80.0, None], [85.0, 70.0]]), (1, [[82.0, None], [84.0, 75.0]])):
        name = f"lwf-seed{seed}"
        d = _write_run(root, name, method="lwf", seed=seed, n_tasks=2, finished_tasks=2, accuracy_matrix=A,
                       eval_time_s=[0.5, 0.7], task_time_s=[1.0, 1.0], total_time_s=2.0)  # fmt: skip
        cfg = {"name": name, "seed": seed, "out_dir": str(root), "method": {"name": "lwf", "lamb": 1.0}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        dirs.append(d)
    return dirs


def test_html_report_is_self_contained_and_has_a_markdown_twin(runs: list[Path], tmp_path: Path) -> None:
    report = write_report([*runs, *_seed_pair(tmp_path / "runs")], tmp_path / "rep")
    page = (report.parent / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:)', page)  # nothing fetched: no file, no network
    assert "<script" not in page and "<link" not in page and "url(" not in page
    images = re.findall(r'<img class="plot" alt="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in images] == ["accuracy", "forgetting per task", "accuracy matrices"]
    for (_, data), name in zip(images, ["accuracy.png", "forgetting.png", "matrices.png"], strict=True):
        assert base64.b64decode(data) == (report.parent / name).read_bytes()
    # run table (both forgetting definitions, test time) and the seeds table: mean ± sample std, n
    cells = ("<th>forgetting (FACIL)</th>", "<th>test time (s)</th>", "<td>63.7</td>", "<td>-5.0</td>", "<td>1.2</td>",
             "<td>78.5 ± 1.4</td>", "<td>-3.5 ± 2.1</td>", '<td class="text">0, 1</td>')  # fmt: skip
    for cell in cells:
        assert cell in page, cell
    assert page.count("<details><summary>resolved config (config.yaml)</summary>") == 4
    assert "lamb: 1.0" in page
    md = report.read_text(encoding="utf-8")
    for image in ("![accuracy](accuracy.png)", "![forgetting per task](forgetting.png)",
                  "![accuracy matrices](matrices.png)"):  # fmt: skip
        assert image in md
    assert "| 78.5 ± 1.4 |" in md
    assert md.count("<details><summary>resolved config (config.yaml)</summary>") == 4
    header = (report.parent / "groups.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["group", "n", "seeds", "tasks"] and "average_accuracy_std" in header


def test_compare_prints_the_table_aligned(runs: list[Path], tmp_path: Path, capsys) -> None:
    assert main(["compare", str(runs[0]), str(runs[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and set(lines[1]) == {"-", " "}
    assert len({len(line) for line in lines}) == 1  # numbers right-aligned to the last column
    assert lines[0].startswith("run" + " " * 12 + "method") and "forgetting (FACIL)" in lines[0]
    assert lines[2].split()[:5] == ["demo-finetune", "finetune", "digits", "class_il", "3/3"]
    assert "63.7" in lines[2].split() and "1,234,567" in lines[3].split()
    _seed_pair(tmp_path / "runs")
    assert main(["compare", str(tmp_path / "runs")]) == 0  # a folder of runs: each run, then the seeds
    out = capsys.readouterr().out
    assert "over seeds: mean ± sample std (ddof=1)" in out and "78.5 ± 1.4" in out
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no metrics.json or sweep.json here" in capsys.readouterr().err


def test_report_of_a_sweep_folder(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "runs" / "sw"
    _seed_pair(sweep)
    runs = [{"name": n, "overrides": [f"seed={n[-1]}"], "status": "finished"} for n in ("lwf-seed0", "lwf-seed1")]
    runs.append({"name": "lwf-seed2", "overrides": ["seed=2"], "status": "pending"})
    (sweep / "sweep.json").write_text(json.dumps({"preset": "demo/default", "fixed": [], "grid": {}, "runs": runs}))
    with pytest.warns(UserWarning, match="1 of 3 runs have no metrics yet"):
        assert main(["report", str(sweep)]) == 0
    assert "78.5 ± 1.4" in capsys.readouterr().out
    assert (sweep / "report" / "report.html").is_file() and (sweep / "report" / "report.md").is_file()
    with pytest.warns(UserWarning, match="1 of 3 runs have no metrics yet"):  # a folder of runs and sweeps
        assert main(["compare", str(tmp_path / "runs")]) == 0
    assert "lwf-seed1" in capsys.readouterr().out


def _chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((path for name in names if (path := shutil.which(name))), None)


_PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.querySelectorAll("img.plot")].map((img) => {
    const r = img.getBoundingClientRect();
    return {alt: img.alt, complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
            box: [r.left + scrollX, r.top + scrollY, r.width, r.height]};
  });
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def _run_chromium(binary: str, profile: Path, *args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--force-device-scale-factor=1", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000"]  # fmt: skip
    done = subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_html_plots_render_in_chromium(runs: list[Path], tmp_path: Path) -> None:
    from matplotlib.image import imread

    report = write_report([*runs, *_seed_pair(tmp_path / "runs")], tmp_path / "rep")
    page = report.parent / "report.html"
    probe = tmp_path / "probe.html"  # the page plus a script that reports each plot's decoded size and box
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    width, binary = 1280, _chromium()
    dom = _run_chromium(binary, tmp_path / "profile", f"--window-size={width},900", "--dump-dom", probe.as_uri())
    info = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert [i["alt"] for i in info["images"]] == ["accuracy", "forgetting per task", "accuracy matrices"]
    for image in info["images"]:  # decoded, and laid out at a readable size inside the window
        assert image["complete"] and image["natural"][0] > 500 and image["natural"][1] > 300, image
        left, top, w, h = image["box"]
        assert w > 500 and h > 200 and left >= 0 and left + w <= width, image

    shot = tmp_path / "shot.png"
    _run_chromium(binary, tmp_path / "profile", f"--window-size={width},{info['height']}", f"--screenshot={shot}",
                  page.as_uri())  # fmt: skip
    pixels = imread(shot)[..., :3]  # (H, W, 3) in [0, 1]
    assert pixels.shape[:2] == (info["height"], width)
    # each plot's region is drawn: dark strokes (axes, text) and coloured marks (lines and bands; bars; heat-map cells;
    # measured: 0.8 %, 18 %, 43 % of the region)
    least_coloured = {"accuracy": 0.004, "forgetting per task": 0.05, "accuracy matrices": 0.15}
    for image in info["images"]:
        left, top, w, h = (round(v) for v in image["box"])
        region = pixels[top + 2 : top + h - 2, left + 2 : left + w - 2]
        dark = (region.max(axis=-1) < 0.35).mean()
        coloured = (region.max(axis=-1) - region.min(axis=-1) > 0.25).mean()
        assert dark > 0.003 and coloured > least_coloured[image["alt"]], (image["alt"], dark, coloured)
