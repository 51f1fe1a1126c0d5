"""The commands that need no model start without torch: the parser, ``--help``, ``list``, ``compare`` and ``report``
(each checked in a fresh interpreter, by what it imported, never by a clock); ``retain list``'s light names
(``retain.catalog``) equal the real registries; ``retain sweep --out DIR``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retain import catalog
from retain.cli import main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm", "retain.engine", "retain.methods", "retain.models", "retain.data")

# `python -m retain ARGS` (runpy, as the console script does), then the heavy modules it imported, on the last line
_PROBE = """
import json, runpy, sys
sys.argv = ["retain", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("retain", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


def _retain(*args: str) -> tuple[dict, str]:
    """``retain ARGS`` in a fresh interpreter: ({code, heavy modules imported}, its other output)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *out, last = done.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(out) + done.stderr


@pytest.mark.parametrize(
    "args",
    [["--help"], ["list"], ["run", "--help"], ["inspect", "--help"], ["pretrain", "--help"], ["report", "--help"],
     ["compare", "--help"], ["sweep", "--help"], ["export", "--help"], ["predict", "--help"], ["demo", "--help"]],
)  # fmt: skip
def test_help_and_list_import_no_torch(args):
    result, out = _retain(*args)
    assert result == {"code": 0, "heavy": []}, out
    assert out.strip()


def _write_run(root: Path, name: str) -> Path:
    """A finished run's folder as ``retain compare`` and ``retain report`` read it (metrics.json, config.yaml)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"name: {name}\n", encoding="utf-8")
    record = {"run": name, "method": "finetune", "backbone": "vit_tiny_patch4_32", "dataset": "digits",
              "protocol": "class_il", "n_tasks": 2, "finished_tasks": 2,
              "accuracy_matrix": [[98.0, None], [60.0, 97.0]], "task_id_accuracy": [None, None], "metrics": {},
              "task_time_s": [1.0, 1.0],
              "trainable_params": [10, 10], "bytes_per_task": [40, 40], "total_time_s": 2.0}  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(record), encoding="utf-8")
    return run_dir


def test_compare_and_report_of_a_run_import_no_torch(tmp_path):
    run_dir = _write_run(tmp_path / "runs", "ft")
    result, out = _retain("compare", str(run_dir))
    assert result == {"code": 0, "heavy": []}, out
    assert "avg acc" in out.splitlines()[0] and out.splitlines()[-1].startswith("ft ")
    result, out = _retain("report", str(run_dir), "--out", str(tmp_path / "rep"))
    assert result == {"code": 0, "heavy": []}, out
    assert (tmp_path / "rep" / "report.md").is_file()


def test_a_user_error_of_a_light_command_is_one_line_without_torch(tmp_path):
    result, out = _retain("compare", str(tmp_path / "nowhere"))
    assert result == {"code": 2, "heavy": []}
    assert out.strip().startswith("retain: error: ") and len(out.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- the light names


def test_catalog_equals_the_registries():
    import timm

    from retain.config import METHOD_CONFIGS
    from retain.data import DATASETS
    from retain.methods import METHODS
    from retain.models import PRETRAINED_TAGS, backbone_names

    assert list(catalog.METHOD_NAMES) == METHODS.names() == METHOD_CONFIGS.names()
    assert list(catalog.DATASET_NAMES) == DATASETS.names()
    assert list(catalog.ARCHITECTURES) == sorted(timm.list_models(list(catalog.ARCHITECTURE_PATTERNS)))
    assert catalog.PRETRAINED_TAGS == {t: (i.source, i.used_by) for t, i in PRETRAINED_TAGS.items()}
    assert catalog.backbone_names() == backbone_names()


def test_list_prints_what_the_registries_hold(capsys):
    from retain.config import preset_names
    from retain.data import DATASETS
    from retain.methods import method_names
    from retain.models import PRETRAINED_TAGS, backbone_names

    expected = ["methods:   " + ", ".join(method_names()), "datasets:  " + ", ".join(DATASETS.names()), "presets:"]
    expected += [f"  {name}" for name in preset_names()] + ["backbones (any timm name also works):"]
    for name in backbone_names():
        info = PRETRAINED_TAGS.get(name)
        expected.append(f"  {name}" + (f"  [{info.source}; {info.used_by}]" if info else ""))
    assert main(["list"]) == 0
    assert capsys.readouterr().out.splitlines() == expected


# ------------------------------------------------------------------------------------------- retain sweep --out


def test_sweep_help_names_out():
    result, out = _retain("sweep", "--help")
    assert "--out DIR" in out and "the sweep folder" in out


def test_sweep_out_is_the_sweep_folder_and_a_rerun_skips_finished_runs(tiny, tmp_path, monkeypatch, capsys):
    from retain import engine

    out = tmp_path / "elsewhere" / "my-sweep"
    args = ["sweep", "demo/default", *tiny(name="sw"), "seed=0,1", "--out", str(out)]
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"sweep {out} (2 runs)"
    assert [line.split()[:2] for line in printed[1:]] == [["pending", "seed=0"], ["pending", "seed=1"]]
    assert not out.exists() and not (tmp_path / "runs").exists()  # a dry run writes nothing

    started = []

    def fake_run(cfg, resume=False, log=print):  # a finished run's metrics.json, where the engine would write it
        started.append(cfg.name)
        assert Path(cfg.out_dir) == out
        _write_run(Path(cfg.out_dir), cfg.name)

    monkeypatch.setattr(engine, "run", fake_run)
    assert main(args) == 0
    assert started == ["seed=0", "seed=1"] and (out / "sweep.json").is_file()
    assert json.loads((out / "sweep.json").read_text())["runs"][1]["status"] == "finished"
    assert main(args) == 0  # the same command, the same --out: both runs skipped
    assert started == ["seed=0", "seed=1"]
    assert main([*args, "--dry-run"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[-2:]] == ["finished", "finished"]
    assert not (tmp_path / "runs").exists()  # nothing under out_dir: --out is the sweep folder
