"""Sweeps: value lists, the cross product and its index, finished runs skipped, an interrupted run resumed, every
config validated before anything runs, a changed command extended or refused; runs grouped over seeds with mean ±
sample std on hand-made metrics.json files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from retain.cli import main
from retain.config import ConfigError
from retain.engine import loop
from retain.report import group_rows, group_runs, to_markdown, to_text
from retain.report.groups import GROUP_COLUMNS
from retain.report.tables import Stat
from retain.sweep import SWEEP_FILE, parse_sweep, plan_sweep, run_status, split_values


def test_split_values_only_on_top_level_commas():
    assert split_values("0,1,2") == ["0", "1", "2"]
    assert split_values("[1,2,3]") == ["[1,2,3]"]
    assert split_values("[0,1],[1,0]") == ["[0,1]", "[1,0]"]
    assert split_values("{per_class: 3, k: 5}") == ["{per_class: 3, k: 5}"]
    assert split_values("{a: [1, 2]},{a: 3}") == ["{a: [1, 2]}", "{a: 3}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("1e-3") == ["1e-3"]


@pytest.mark.parametrize(
    ("items", "message"),
    [(["seed"], "not key=value"), (["seed=0,,1"], "empty value"), (["name=a,b"], "name cannot take a list"),
     (["out_dir=a,b"], "out_dir cannot take a list"), (["seed=0,1", "seed=2"], "seed is given twice")],
)  # fmt: skip
def test_parse_sweep_rejects(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(items)


def test_every_config_is_validated_before_any_run(tiny, tmp_path, monkeypatch, capsys):
    from retain import engine

    monkeypatch.setattr(engine, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ConfigError, match="unknown key train.lrr"):
        plan_sweep("demo/default", tiny(name="bad") + ["train.lrr=0.1,0.2"])
    # only the last combination is bad: still nothing runs, and the error names it and the key
    assert main(["sweep", "demo/default", *tiny(name="bad"), "seed=0,1", "train.lr=0.1,-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retain: error: sweep run seed=0 train.lr=-1: train.lr=-1")
    assert not (tmp_path / "runs" / "bad").exists()


def test_bracketed_values_are_one_value_each(tiny):
    # data.options={n_classes: 4, ...} (from tiny) stays one fixed value; two class orders make two runs
    sweep = plan_sweep("demo/default", tiny(name="orders") + ["scenario.class_order=[0,1,2,3],[3,2,1,0]", "seed=0,1"])
    assert [r.name for r in sweep.runs] == ["class_order=0-1-2-3_seed=0", "class_order=0-1-2-3_seed=1",
                                            "class_order=3-2-1-0_seed=0", "class_order=3-2-1-0_seed=1"]  # fmt: skip
    cfg = sweep.configs["class_order=3-2-1-0_seed=1"]
    assert cfg.scenario.class_order == [3, 2, 1, 0] and cfg.seed == 1 and cfg.data.options["n_classes"] == 4
    assert cfg.name == "class_order=3-2-1-0_seed=1" and cfg.out_dir == str(sweep.path) and sweep.path.name == "orders"
    assert not sweep.path.exists()  # planning writes nothing


def _index(path: Path) -> dict:
    return json.loads((path / SWEEP_FILE).read_text())


def test_cross_product_skips_finished_runs_and_resumes_an_interrupted_one(tiny, tmp_path, monkeypatch, capsys):
    over = tiny(name="sw", **{"train.threads": "1"}) + ["method.name=finetune,linear_probe", "seed=0,1"]
    sweep_dir = tmp_path / "runs" / "sw"
    real_fit, calls = loop.fit_task, []

    def stop_in_third_run(method, task, ctx, *args, **kwargs):
        calls.append(task.index)
        if len(calls) == 6:  # 2 tasks per run: the third run's second task
            raise KeyboardInterrupt
        return real_fit(method, task, ctx, *args, **kwargs)

    monkeypatch.setattr(loop, "fit_task", stop_in_third_run)
    assert main(["sweep", "demo/default", *over]) == 130
    assert "continue with: retain sweep demo/default" in capsys.readouterr().err
    names = ["finetune_seed=0", "finetune_seed=1", "linear_probe_seed=0", "linear_probe_seed=1"]
    index = _index(sweep_dir)
    assert [r["name"] for r in index["runs"]] == names
    assert [r["status"] for r in index["runs"]] == ["finished", "finished", "interrupted", "pending"]
    assert index["grid"] == {"method.name": ["finetune", "linear_probe"], "seed": ["0", "1"]}
    assert run_status(sweep_dir / names[2]) == "interrupted" and run_status(sweep_dir / names[3]) == "pending"
    finished = {n: (sweep_dir / n / "metrics.json").stat().st_mtime_ns for n in names[:2]}

    monkeypatch.setattr(loop, "fit_task", real_fit)
    assert main(["sweep", "demo/default", *over]) == 0
    out = capsys.readouterr().out
    assert "1/4 finetune_seed=0: finished before, skipped" in out and "2/4 finetune_seed=1: finished before" in out
    assert "3/4 linear_probe_seed=0: resuming" in out and "[resume] 1 finished task(s)" in out
    assert "4/4 linear_probe_seed=1: starting" in out
    assert {n: (sweep_dir / n / "metrics.json").stat().st_mtime_ns for n in names[:2]} == finished
    assert [r["status"] for r in _index(sweep_dir)["runs"]] == ["finished"] * 4
    for name in names:
        cfg = yaml.safe_load((sweep_dir / name / "config.yaml").read_text())
        assert (cfg["method"]["name"], cfg["seed"], cfg["name"]) == (name[:-7], int(name[-1]), name)
        assert json.loads((sweep_dir / name / "metrics.json").read_text())["finished_tasks"] == 2
    assert "over seeds: mean ± sample std (ddof=1)" in out  # the sweep ends with `retain compare` of its folder
    groups = [line for line in out.splitlines() if line.startswith(("finetune ", "linear_probe "))]
    assert len(groups) == 2 and all(" 2  0, 1 " in line for line in groups)

    # the same keys with more values extend the sweep (only the new runs are pending); another base is refused
    more = plan_sweep("demo/default", over[:-1] + ["seed=0,1,2"])
    assert [r.name for r in more.runs] == names + ["finetune_seed=2", "linear_probe_seed=2"]
    assert [run_status(sweep_dir / r.name) for r in more.runs] == ["finished"] * 4 + ["pending"] * 2
    with pytest.raises(ConfigError, match="holds a sweep with other fixed overrides"):
        plan_sweep("demo/default", over + ["train.lr=0.5"])
    with pytest.raises(ConfigError, match="holds a sweep with other swept keys"):
        plan_sweep("demo/default", over + ["train.lr=0.5,0.1"])
    assert main(["sweep", "demo/default", *over[:-1], "seed=0,1,2", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "finished    finetune_seed=1" in listing and "pending     linear_probe_seed=2" in listing


# ----------------------------------------------------------------------------------------------- grouping


def _fake_run(root: Path, name: str, seed: int, A: list, lr: float = 0.01, config: bool = True) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if config:
        cfg = {"name": name, "seed": seed, "out_dir": str(root), "train": {"lr": lr, "epochs": 1},
               "method": {"name": "finetune"}}  # fmt: skip
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    record = {"run": name, "method": "finetune", "seed": seed, "n_tasks": 2, "finished_tasks": len(A),
              "accuracy_matrix": A, "task_time_s": [1.0, 2.0 + seed][: len(A)], "eval_time_s": [0.5, 0.5][: len(A)],
              "trainable_params": [100, 100], "bytes_per_task": [400, 400]}  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


def test_runs_that_differ_only_in_seed_are_averaged(tmp_path):
    root = tmp_path / "runs"
    dirs = [
        _fake_run(root, "a0", 0, [[90.0, None], [70.0, 80.0]]),  # avg acc 75, forgetting 20, AIA 82.5
        _fake_run(root, "other-lr", 0, [[50.0, None], [40.0, 60.0]], lr=0.1),
        _fake_run(root, "a1", 1, [[94.0, None], [74.0, 84.0]]),  # avg acc 79, forgetting 20, AIA 86.5
        _fake_run(root, "a2", 2, [[86.0, None], [60.0, 92.0]]),  # avg acc 76, forgetting 26, AIA 81
        _fake_run(root, "a3-unfinished", 3, [[88.0, None]]),  # same config, one task: a group of its own
        _fake_run(root, "no-config", 0, [[90.0, None], [70.0, 80.0]], config=False),
    ]
    groups = group_runs(dirs)
    assert [g.label for g in groups] == ["finetune (train.lr=0.01) [a0]", "finetune (train.lr=0.1)",
                                         "finetune (train.lr=0.01) [a3-unfinished]", "no-config"]  # fmt: skip
    assert [g.n for g in groups] == [3, 1, 1, 1] and groups[0].seeds == [0, 1, 2]
    rows = group_rows(groups)
    a = rows[0]
    assert a["n"] == 3 and a["seeds"] == "0, 1, 2" and a["tasks"] == "2/2"
    # mean (75 + 79 + 76) / 3; sample std: deviations -5/3, 7/3, -2/3 -> sqrt((25 + 49 + 4) / 9 / 2)
    assert a["average_accuracy"] == pytest.approx(Stat(230 / 3, math.sqrt(78 / 18), 3))
    assert a["forgetting"] == pytest.approx(Stat(22.0, math.sqrt(12.0), 3))  # 20, 20, 26
    assert a["backward_transfer"] == pytest.approx(Stat(-22.0, math.sqrt(12.0), 3))
    assert a["average_incremental_accuracy"] == pytest.approx(Stat(250 / 3, math.sqrt((25 + 361 + 196) / 36 / 2), 3))
    assert a["total_time_s"] == pytest.approx(Stat(4.0, 1.0, 3))  # 3, 4, 5 s of training
    assert a["trainable_params"] == pytest.approx(Stat(100.0, 0.0, 3))
    single = rows[1]["average_accuracy"]
    assert single.n == 1 and single.mean == pytest.approx(50.0) and math.isnan(single.std)
    text = to_text(rows, GROUP_COLUMNS)
    assert "76.7 ± 2.1" in text and "22.0 ± 3.5" in text and "-22.0 ± 3.5" in text
    assert "| 50.0 |" in to_markdown(rows, GROUP_COLUMNS)  # n = 1: the mean alone


def test_a_failed_run_is_marked_and_the_others_still_run(tiny, tmp_path, monkeypatch, capsys):
    from retain.engine import RunError

    real_fit, calls = loop.fit_task, []

    def fail_second_run(method, task, ctx, *args, **kwargs):
        calls.append(task.index)
        if len(calls) == 3:  # the second run's first task
            raise RunError("loss is nan at step 3")
        return real_fit(method, task, ctx, *args, **kwargs)

    monkeypatch.setattr(loop, "fit_task", fail_second_run)
    with pytest.warns(UserWarning, match="1 of 3 runs have no metrics yet"):  # the table shows the others
        assert main(["sweep", "demo/default", *tiny(name="f", **{"train.threads": "1"}), "seed=0,1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("retain: error: 1 run(s) of the sweep failed, seed=1 first: loss is nan at step 3")
    runs = _index(tmp_path / "runs" / "f")["runs"]
    assert [(r["name"], r["status"]) for r in runs] == [("seed=0", "finished"), ("seed=1", "failed"),
                                                        ("seed=2", "finished")]  # fmt: skip
    assert runs[1]["error"] == "loss is nan at step 3" and len(calls) == 5
