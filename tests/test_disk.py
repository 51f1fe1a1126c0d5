"""The disk a run uses: per-task checkpoints pruned to ``run.keep_checkpoints`` (resume and export still work), the
plateau schedule's best-weights copy holding only what the stage trains (same results), and ``retain inspect``'s
estimate against the bytes a real run writes."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import retain
from retain.cli import main
from retain.config import ConfigError, load_config
from retain.engine import checkpoint as ck
from retain.engine import run
from retain.engine.schedules import Schedule
from retain.inspect import inspect_config

from conftest import CONFIT_CNN

QUIET = {"log": lambda *_: None}
THREE_TASKS = {"scenario.n_tasks": "3", "data.options": "{n_classes: 6, n_per_class: 12, n_test_per_class: 6, "
               "image_size: 16}"}  # fmt: skip


class Crash(BaseException):
    """Stands for a crash: nothing in the run catches it."""


def _run(over: list[str], name: str, resume: bool = False, **extra: str) -> dict:
    return run(load_config(None, over + [f"name={name}"] + [f"{k}={v}" for k, v in extra.items()]), resume, **QUIET)


def _files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _payload(path: Path) -> int:
    """Bytes of a safetensors file's tensors (its size less the length field and the JSON header)."""
    with path.open("rb") as f:
        return path.stat().st_size - 8 - struct.unpack("<Q", f.read(8))[0]


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- keep_checkpoints


def test_keep_checkpoints_prunes_and_resume_and_export_still_work(tiny, tmp_path, monkeypatch):
    over = tiny(**THREE_TASKS, **{"run.checkpoint_every": "1"})
    runs = tmp_path / "runs"
    full = _run(over, "all", **{"run.keep_checkpoints": "all"})
    assert _files(runs / "all") == ["task_000.safetensors", "task_001.safetensors", "task_002.safetensors"]
    _run(over, "two", **{"run.keep_checkpoints": "2"})
    assert _files(runs / "two") == ["task_001.safetensors", "task_002.safetensors"]

    real, seen = ck.Checkpointer.after_step, [0]

    def after_step(self, loop):  # 3 steps a task: step 8 is task 2's second
        real(self, loop)
        seen[0] += 1
        if seen[0] == 8:
            raise Crash

    monkeypatch.setattr(ck.Checkpointer, "after_step", after_step)
    with pytest.raises(Crash):
        _run(over, "cut")  # the default: last
    monkeypatch.undo()
    files = _files(runs / "cut")
    assert files[0] == "midtask.json" and files[1].startswith("midtask_") and files[2:] == ["task_001.safetensors"]
    resumed = _run(over, "cut", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"] and _files(runs / "cut") == ["task_002.safetensors"]
    final = load_file(str(runs / "all" / "checkpoints" / "task_002.safetensors"))
    assert _same_tensors(load_file(str(runs / "cut" / "checkpoints" / "task_002.safetensors")), final)

    retain.export_run(runs / "cut", tmp_path / "cut.safetensors")
    retain.export_run(runs / "all", tmp_path / "all.safetensors")
    assert _same_tensors(*(load_file(str(tmp_path / f"{n}.safetensors")) for n in ("cut", "all")))

    again = _run(over, "all", resume=True, **{"run.keep_checkpoints": "last"})  # may change on resume: prunes now
    assert again["accuracy_matrix"] == full["accuracy_matrix"] and _files(runs / "all") == ["task_002.safetensors"]


def test_keep_checkpoints_names_the_valid_values(tiny):
    for bad in ("none", "0", "-1"):
        with pytest.raises(ConfigError, match=rf"run.keep_checkpoints=.*{bad}.*; valid: last, all or a number"):
            load_config(None, tiny(**{"run.keep_checkpoints": bad}))


# ---------------------------------------------------------------------------------------------------- plateau's copy

PLATEAU = {**CONFIT_CNN, "method.name": "confit", "train.epochs": "5", "train.schedule": "plateau",
           "train.patience": "1", "train.lr_factor": "2", "train.stop_lr": "1e-6", "train.lr": "0.05",
           "scenario.val_fraction": "0.25"}  # fmt: skip


def test_plateau_copies_only_what_the_stage_trains_with_the_same_results(tiny, tmp_path, monkeypatch):
    """ConFiT's head, head+BN and whole-network stages (BatchNorm statistics move in all) under plateau with
    restore_best: the run ends with the weights of the former full-model copy, and a mid-task checkpoint's copy
    holds the stage's trained parameters and the buffers only."""
    over = tiny(**PLATEAU, **{"run.checkpoint_every": "1"})
    restores, real_restore = [0], Schedule._restore

    def counted(self, model):
        restores[0] += 1
        real_restore(self, model)

    monkeypatch.setattr(Schedule, "_restore", counted)
    now = _run(over, "now")
    assert restores[0] >= 4  # decays and stage ends reload the copy

    def whole(self, model):
        return {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(Schedule, "snapshot", whole)
    before = _run(over, "before")  # the former copy: the model's whole state
    final = (load_file(str(tmp_path / "runs" / n / "checkpoints" / "task_001.safetensors")) for n in ("now", "before"))
    assert now["accuracy_matrix"] == before["accuracy_matrix"] and _same_tensors(*final)
    monkeypatch.undo()

    copies = []
    real_save = ck.Checkpointer.save

    def save(self, loop):  # the second task's head stage, once it has a copy: crash after saving it
        real_save(self, loop)
        best = loop.schedule.best_state
        if loop.task.index == 1 and loop.stage.name == "head" and best is not None:
            model = loop.method.model
            params = dict(model.named_parameters())
            trained = {n for n, p in params.items() if p.requires_grad}
            state = model.state_dict()
            copies.append((set(best), {k for k in state if k not in params or k in trained}, _nbytes(best),
                           _nbytes(state)))  # fmt: skip
            raise Crash

    monkeypatch.setattr(ck.Checkpointer, "save", save)
    with pytest.raises(Crash):
        _run(over, "cut")
    monkeypatch.undo()
    kept, expected, copy_bytes, model_bytes = copies[0]
    mid = ck.read_midtask(tmp_path / "runs" / "cut", **QUIET)
    assert set(mid.loop["schedule"]["best_state"]) == kept == expected and copy_bytes < model_bytes / 20
    assert any(k.endswith("running_mean") for k in kept)  # buffers are kept: BatchNorm statistics move in this stage
    resumed = _run(over, "cut", resume=True)
    final = (load_file(str(tmp_path / "runs" / n / "checkpoints" / "task_001.safetensors")) for n in ("now", "cut"))
    assert resumed["accuracy_matrix"] == now["accuracy_matrix"] and _same_tensors(*final)


# ---------------------------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("method", ["finetune", "ewc", "ln_tuning", "lora", "block_expansion"])
def test_inspect_disk_estimate_is_the_tensor_bytes_a_run_writes(tiny, tmp_path, monkeypatch, method):
    over = tiny(**THREE_TASKS, **{"method.name": method, "train.epochs": "2", "run.keep_checkpoints": "all"})
    info = inspect_config(load_config(None, over + ["name=x"]))
    run_dir, largest, seen = tmp_path / "runs" / "x", [0], [0]
    real_replace = os.replace

    def replace(src, dst):  # after every rename the previous file is still there: the moments of the peak
        real_replace(src, dst)
        folder = run_dir / "checkpoints"
        if folder.is_dir():
            seen[0] = max(seen[0], sum(_payload(p) for p in folder.glob("*.safetensors")))
        if Path(dst).name.startswith("midtask_"):
            largest[0] = max(largest[0], _payload(Path(dst)))

    monkeypatch.setattr(os, "replace", replace)
    _run(over, "x")
    monkeypatch.undo()
    written = [_payload(p) for p in sorted((run_dir / "checkpoints").glob("task_*.safetensors"))]
    assert info["disk_checkpoint_bytes"] == written and info["disk_all_checkpoints"] == sum(written)
    assert info["disk_midtask_bytes"] == largest[0] > written[-1]  # plus the optimiser's state
    assert info["disk_peak"] == seen[0]
    retain.export_run(run_dir, tmp_path / "a.safetensors")
    assert info["disk_artefact_bytes"] == _payload(tmp_path / "a.safetensors")
    last = inspect_config(load_config(None, over + ["run.keep_checkpoints=last"]))
    assert last["disk_at_end"] == written[-1] and last["disk_peak"] < info["disk_peak"]


def test_inspect_prints_the_disk_estimate(capsys):
    assert main(["inspect", "demo/default", "method.name=ewc"]) == 0
    lines = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["disk_estimate"].startswith("from tensor sizes") and lines["disk_keep_checkpoints"] == "last"
    assert lines["disk_checkpoint_bytes"] == ", ".join(["6.54 MB"] * 5)
    assert main(["inspect", "demo/default", "method.name=ewc", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    backbone, head = info["backbone_params"], info["trainable_params"] - info["backbone_params"]
    # the model (5 heads) and a Fisher and an old value of each backbone weight, float32; the default keeps one
    assert info["disk_at_end"] == info["disk_checkpoint_bytes"][-1] == 4 * (3 * backbone + 5 * head)
