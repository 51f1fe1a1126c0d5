"""The GPU check (``python -m benchmarks.gpu_check``) is ready before a GPU is lent: without CUDA it checks its plan
and exits 0 in one line; its whole code path runs on the CPU on two tiny models."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks import gpu_check  # noqa: E402


def test_without_cuda_it_checks_its_plan_and_says_so_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu_check: no CUDA device on this machine; the plan (4 models")


def test_a_broken_plan_is_named():
    bad = (gpu_check.Model("nope", "no_such_backbone", 32, 8),)
    problems = gpu_check.check_plan(bad)
    assert len(problems) == 1 and problems[0].startswith("nope: KeyError")


def test_the_whole_check_runs_on_the_cpu_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--workers",
        "2",
        "--no-compile",
        "--methods",
        "finetune",
        "ln_tuning",
        "confit",
    ]  # every method on the CPU: tests/test_methods.py
    assert gpu_check.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["rows"]] == ["tiny ViT", "tiny ResNet"]
    for row in result["rows"]:
        assert row["fp32"]["img_s"] > 0 and row["tf32"]["img_s"] > 0 and row["bf16"]["img_s"] > 0
        assert "bf16+compile" not in row
        assert row["loader"]["img_s"] > 0 and row["loader"]["workers"] == 2
        assert row["loader_device_resize"]["img_s"] > 0 and row["loader_device_resize"]["workers"] == 2
        assert row["agreement"]["rel_diff"] < 0.1  # bf16 and fp32 train alike for 20 steps
    # SIGKILL inside an epoch with 2 workers and augmentation, then --resume: the uninterrupted run's weights
    assert result["resume"]["killed"] and result["resume"]["identical"]
    assert list(result["methods"]) == ["finetune", "ln_tuning", "confit"]
    assert all(r["ok"] for r in result["methods"].values())
    assert result["precision"] == {"device": "cpu", "autocast": None, "tf32_matmul": False, "tf32_cudnn": False}
    assert "| tiny ViT | 8 |" in capsys.readouterr().out
