"""Mid-task checkpoints: a run stopped at any point (exception, SIGKILL of a real process, Ctrl-C, full disk) and
resumed ends with the accuracy matrix and weights of an uninterrupted run."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retain.config import load_config
from retain.engine import RunError, run
from retain.engine import checkpoint as ck
from retain.engine import loop as loop_module
from retain.engine import rundir as rd
from retain.engine.stages import rng_state
from retain.methods import method_names

QUIET = {"log": lambda *_: None}
FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked copy of this process (POSIX)")


class Crash(BaseException):
    """Stands for a crash: nothing in the run catches it."""


def _overrides(tiny, method="finetune", **extra):
    over = {"method.name": method, "train.epochs": "2", "run.checkpoint_every": "2", **extra}
    if method == "confit":  # a ResNet: BatchNorm snapshots
        over |= {"model.backbone": "cifar_resnet20", "model.kwargs": "{}", "scenario.protocol": "task_il"}
    return tiny(**over)


def _run(over, name, resume=False, preset=None):
    return run(load_config(preset, over + [f"name={name}"]), resume=resume, **QUIET)


def _final_weights(tmp_path, name):
    return load_file(str(tmp_path / "runs" / name / "checkpoints" / "task_001.safetensors"))


def _assert_same_run(tmp_path, a, b, rec_a, rec_b):
    assert rec_a["accuracy_matrix"] == rec_b["accuracy_matrix"]
    wa, wb = _final_weights(tmp_path, a), _final_weights(tmp_path, b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _crash_after_step(monkeypatch, k):
    real, seen = ck.Checkpointer.after_step, [0]

    def after_step(self, loop):
        real(self, loop)
        seen[0] += 1
        if seen[0] == k:
            raise Crash

    monkeypatch.setattr(ck.Checkpointer, "after_step", after_step)


# ---------------------------------------------------------------------------------------------------- serialisation


def test_nested_states_round_trip_through_json_and_tensors():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    state = {"opt": opt.state_dict(), "rng": rng_state(), "gen": torch.Generator().manual_seed(3).get_state(),
             "floats": [float("inf"), -0.0, 1e-300], "none": None, "$odd": {1: (2, "x")}}  # fmt: skip
    tensors = {}
    text = json.dumps(ck.pack(state, "s", tensors))
    back = ck.unpack(json.loads(text), tensors)
    assert back["opt"]["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert back["opt"]["param_groups"] == opt.state_dict()["param_groups"]
    assert back["rng"]["python"] == state["rng"]["python"] and back["rng"]["numpy"][0] == "MT19937"
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert back["rng"]["numpy"][1].dtype == state["rng"]["numpy"][1].dtype
    assert back["gen"].equal(state["gen"]) and back["floats"] == state["floats"] and back["$odd"] == {1: (2, "x")}


# ---------------------------------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("method", [m for m in method_names() if m != "simplecil"])  # simplecil takes no step
def test_crash_inside_a_task_resumes_exactly(tiny, tmp_path, monkeypatch, method):
    """Step 9: task 0's LN-tuning head stage, ConFiT's second task, the others task 1 mid-epoch; saved every 2."""
    over = _overrides(tiny, method)
    full = _run(over, "full")
    _crash_after_step(monkeypatch, 9)
    with pytest.raises(Crash):
        _run(over, "cut")
    monkeypatch.undo()
    assert (tmp_path / "runs" / "cut" / ck.MANIFEST).exists()
    _assert_same_run(tmp_path, "full", "cut", full, _run(over, "cut", resume=True))


def test_crash_after_the_last_epoch_replays_after_task_and_evaluation(tiny, tmp_path, monkeypatch):
    over = _overrides(tiny, "ewc", **{"run.checkpoint_every": "epoch"})
    full = _run(over, "full")
    from retain.methods.ewc import EWC

    def crash(self, task):
        raise Crash

    monkeypatch.setattr(EWC, "after_task", crash)  # the Fisher pass of task 0
    with pytest.raises(Crash):
        _run(over, "cut")
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "runs" / "cut" / ck.MANIFEST).read_text())
    assert manifest["where"] == "task 0, stage 'train', after epoch 2 (step 6)"  # the end of its last epoch
    _assert_same_run(tmp_path, "full", "cut", full, _run(over, "cut", resume=True))


def test_full_disk_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    over = _overrides(tiny)
    full = _run(over, "full")
    real, calls = ck.save_file, [0]

    def save_file(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == 3:  # half a file written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", save_file)
    with pytest.raises(RunError, match="No space left on device; the previous checkpoint is kept"):
        _run(over, "cut")
    monkeypatch.undo()
    folder = tmp_path / "runs" / "cut" / "checkpoints"
    assert sorted(p.name.split("_")[0] for p in folder.iterdir()) == ["midtask", "midtask.json"]  # no temp file
    assert ck.read_midtask(folder.parent, **QUIET).step == 3  # the second save (step 2, epoch end) is intact
    _assert_same_run(tmp_path, "full", "cut", full, _run(over, "cut", resume=True))


def test_full_disk_at_a_task_end_is_one_error_and_keeps_finished_files(tiny, tmp_path, monkeypatch):
    over = _overrides(tiny)
    real = rd.save_file

    def save_file(tensors, path, metadata=None):
        if "task_001" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(rd, "save_file", save_file)
    with pytest.raises(RunError, match="could not write .*task_001.safetensors: No space left on device"):
        _run(over, "cut")
    folder = tmp_path / "runs" / "cut" / "checkpoints"
    assert (folder / "task_000.safetensors").exists() and not list(folder.glob("*.tmp"))
    assert json.loads((folder.parent / "run_state.json").read_text())["finished_tasks"] == 1


def test_an_incomplete_tensor_file_falls_back_to_the_finished_tasks(tiny, tmp_path):
    over = _overrides(tiny)
    full = _run(over, "full")
    _run(over, "cut")
    out = tmp_path / "runs" / "cut"
    state = json.loads((out / "run_state.json").read_text())
    (out / "run_state.json").write_text(json.dumps(state | {"finished_tasks": 1, "matrices": {
        "class_il": state["matrices"]["class_il"][:1]}}))  # fmt: skip
    (out / ck.MANIFEST).write_text(json.dumps({"format": ck.FORMAT, "tensors": "midtask_x.safetensors", "bytes": 9}))
    (out / "checkpoints" / "midtask_x.safetensors").write_bytes(b"12345")
    logs = []
    rec = run(load_config(None, over + ["name=cut"]), resume=True, log=logs.append)
    assert any("missing or incomplete" in line for line in logs) and rec["accuracy_matrix"] == full["accuracy_matrix"]


def test_a_nan_loss_names_the_step_and_keeps_finite_checkpoints(tiny, tmp_path):
    over = _overrides(tiny, **{"train.lr": "1e6", "run.checkpoint_every": "1"})
    with pytest.raises(RunError, match=r"(loss became nan at step \d+|no longer finite at).*keeps.*lower train.lr"):
        _run(over, "nan")
    mid = ck.read_midtask(tmp_path / "runs" / "nan", **QUIET)
    assert mid is None or all(torch.isfinite(v).all() for v in mid.method.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------- real processes


def _killed(over, name, arm, resume=False):
    """Fork this process; the child runs ``over`` after ``arm()`` set up its own death; True if SIGKILL ended it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            torch.set_num_threads(1)  # a fork inherits no OpenMP workers: more threads than one can hang the child
            arm()
            _run(over, name, resume)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _at_step(k):
    def arm():
        real, seen = ck.Checkpointer.after_step, [0]

        def after_step(self, loop):
            real(self, loop)
            seen[0] += 1
            if seen[0] == k:
                _die()

        ck.Checkpointer.after_step = after_step

    return arm


def _in_save(nth, stage):
    """Die inside the ``nth`` mid-task save: with its tensor file half written, or after renaming it."""

    def arm():
        real_save, real_replace, seen = ck.save_file, ck.os.replace, [0]

        def save_file(tensors, path, metadata=None):
            seen[0] += 1
            real_save(tensors, path, metadata=metadata)
            if seen[0] == nth and stage == "tensors":
                os.truncate(path, 200)
                _die()

        def replace(src, dst):
            real_replace(src, dst)
            if seen[0] == nth and stage == "renamed" and str(dst).endswith(".safetensors"):
                _die()

        ck.save_file, ck.os.replace = save_file, replace

    return arm


def _on_second_call(target, name):
    """Die when ``target.name`` is called the second time, before it runs."""

    def arm():
        real, calls = getattr(target, name), [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                _die()
            return real(*args, **kwargs)

        setattr(target, name, dying)

    return arm


def _after_unlinking(name):
    """Die right after the file ``name`` is deleted (pruning the per-task checkpoints, ``run.keep_checkpoints``)."""

    def arm():
        real = Path.unlink

        def unlink(self, missing_ok=False):
            real(self, missing_ok=missing_ok)
            if self.name == name:
                _die()

        Path.unlink = unlink

    return arm


KILLS = {  # name: (method, where the process dies)
    "mid-epoch": ("finetune", _at_step(5)),
    "half-written-tensor-file": ("finetune", _in_save(3, "tensors")),
    "tensors-renamed-manifest-not": ("finetune", _in_save(3, "renamed")),
    "task-end-before-run-state": ("finetune", _on_second_call(rd.RunDir, "save_state")),
    "task-end-after-run-state": ("finetune", _on_second_call(loop_module, "clear_midtask")),
    "task-end-before-pruning": ("finetune", _on_second_call(rd.RunDir, "prune_checkpoints")),
    "task-end-pruning": ("finetune", _after_unlinking("task_000.safetensors")),
    "evaluation": ("ewc", _on_second_call(loop_module, "evaluate")),
    "ln-tuning-head-stage": ("ln_tuning", _at_step(9)),
    "confit-second-task": ("confit", _at_step(8)),
    "pad-second-task": ("pad", _at_step(10)),
    "block-expansion-second-task": ("block_expansion", _at_step(8)),
    "lora-second-task": ("lora", _at_step(8)),
}


@FORK
@pytest.mark.parametrize("where", [k for k, (m, _) in KILLS.items() if m in method_names()])
def test_sigkill_of_a_real_process_then_resume_is_identical(tiny, tmp_path, where):
    method, arm = KILLS[where]
    over = _overrides(tiny, method)
    full = _run(over, "full")
    assert _killed(over, "cut", arm)
    _assert_same_run(tmp_path, "full", "cut", full, _run(over, "cut", resume=True))


@FORK
def test_sigkill_inside_an_epoch_with_workers_resumes_exactly(tiny, tmp_path):
    """2 dataloader workers (prefetching past the kill) and crop + flip: killed at step 5 (batch 2 of 3 of the second
    epoch; the last checkpoint is at step 4) and resumed with 2 workers, then with none: both end as the
    uninterrupted run (each sample has its own seed)."""
    over = _overrides(tiny, **{"data.augment": "crop_flip", "train.num_workers": "2"})
    full = _run(over, "full")
    assert _killed(over, "cut", _at_step(5))
    _assert_same_run(tmp_path, "full", "cut", full, _run(over, "cut", resume=True))
    assert _killed(over, "cut0", _at_step(5))
    resumed = _run([*over, "train.num_workers=0"], "cut0", resume=True)
    _assert_same_run(tmp_path, "full", "cut0", full, resumed)


@FORK
def test_sigkill_at_random_moments_then_resume_is_identical(tiny, tmp_path):
    """Killed from outside at three random moments (any line: a step, a save, an evaluation), resumed each time."""
    over = _overrides(tiny, **{"train.epochs": "6", "run.checkpoint_every": "1"})
    started = time.perf_counter()
    full = _run(over, "full")
    seconds, rng = time.perf_counter() - started, random.Random(0)
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                torch.set_num_threads(1)  # see _killed
                _run(over, "cut", resume=True)
            finally:
                os._exit(3)
        time.sleep(rng.uniform(0.1, 0.9) * seconds)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    _assert_same_run(tmp_path, "full", "cut", full, _run(over, "cut", resume=True))


def test_ctrl_c_saves_exits_130_with_the_resume_command(tiny, tmp_path):
    over = _overrides(tiny, **{"train.epochs": "8", "run.checkpoint_every": "1", "train.threads": "1"})
    base = tmp_path / "base.yaml"
    base.write_text("name: base\n")
    cmd = [sys.executable, "-m", "retain.cli", "run", str(base), *over, "name=cut"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    manifest = tmp_path / "runs" / "cut" / ck.MANIFEST
    deadline = time.time() + 120
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 130, err
    assert err[-1].startswith("retain: interrupted: stopped at task ") and "checkpoint saved in" in err[-1]
    assert err[-1].endswith("name=cut --resume")
    full = _run(over, "full", preset=str(base))
    _assert_same_run(tmp_path, "full", "cut", full, _run(over, "cut", resume=True, preset=str(base)))
