"""Per-task checkpoints leave out the tensors still equal to the model the run started from (``init_sha256.json``):
they name them with their sha256, ``--resume`` and ``retain export`` take them from the rebuilt method (checked), and
runs stay bit-identical; a checkpoint written before (every tensor, no record) still loads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import retain
from retain.config import load_config
from retain.engine import RunError, train
from retain.engine import loop as loop_module
from retain.engine import rundir as rd
from retain.methods.base import Method
from retain.methods.block_expansion import BlockExpansion
from retain.methods.finetune import Finetune

QUIET = {"log": lambda *_: None}
EXPANSION = {"method.name": "block_expansion", "scenario.protocol": "task_il", "run.keep_checkpoints": "all"}


class Crash(BaseException):
    """Stands for a crash: nothing in the run catches it."""


def _train(over: list[str], name: str, resume: bool = False) -> tuple[dict, Method]:
    return train(load_config(None, over + [f"name={name}"]), resume, **QUIET)


def _file(tmp_path: Path, name: str, task: int) -> Path:
    return tmp_path / "runs" / name / "checkpoints" / f"task_{task:03d}.safetensors"


def _left_out(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[rd.LEFT_OUT])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _crash_after_first_task(monkeypatch) -> None:
    """Stop the run once task 0 and the run state naming its checkpoint are saved."""

    def crash(path):
        raise Crash

    monkeypatch.setattr(loop_module, "clear_midtask", crash)


def _old_style(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Rewrite ``path`` as retain wrote per-task checkpoints before: every tensor, no record of left-out ones."""
    meta = {k: v for k, v in safe_open(str(path), "pt").metadata().items() if k != rd.LEFT_OUT}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)


def test_block_expansion_whole_model_checkpoint_leaves_out_the_frozen_backbone(tiny, tmp_path, monkeypatch):
    """Block Expansion saving the whole model (``Method.checkpoint_state``): the frozen backbone and the untrained
    head are recorded, not stored; resuming after task 1 ends bit-identical to the uninterrupted run."""
    monkeypatch.setattr(BlockExpansion, "checkpoint_state", Method.checkpoint_state)
    over = tiny(**EXPANSION)
    record, method = _train(over, "whole")
    full = method.model.state_dict()
    first, last = _file(tmp_path, "whole", 0), _file(tmp_path, "whole", 1)
    left_out, stored = _left_out(first), load_file(str(first))
    frozen = ["backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "backbone.pos_embed"]
    assert all(n in left_out and n not in stored for n in [*frozen, "head.heads.1.weight"])
    assert left_out.keys() | stored.keys() == full.keys() and not left_out.keys() & stored.keys()
    assert first.stat().st_size < last.stat().st_size < _nbytes(full)
    assert "head.heads.1.weight" not in _left_out(last) and "backbone.blocks.0.attn.qkv.weight" in _left_out(last)

    _crash_after_first_task(monkeypatch)
    with pytest.raises(Crash):
        _train(over, "cut")
    monkeypatch.undo()
    monkeypatch.setattr(BlockExpansion, "checkpoint_state", Method.checkpoint_state)
    resumed, again = _train(over, "cut", resume=True)
    assert resumed["accuracy_matrix"] == record["accuracy_matrix"] and resumed["metrics"] == record["metrics"]
    assert _same(again.model.state_dict(), full)
    assert _same(load_file(str(_file(tmp_path, "cut", 1))), load_file(str(last)))
    assert _left_out(_file(tmp_path, "cut", 1)) == _left_out(last)


def test_resume_after_task_one_is_bit_identical(tiny, tmp_path, monkeypatch):
    """Finetune's first checkpoint leaves out the second task's head; resumed from it, the run ends as one never
    stopped."""
    over = tiny(**{"method.name": "finetune"})
    record, method = _train(over, "full")
    _crash_after_first_task(monkeypatch)
    with pytest.raises(Crash):
        _train(over, "cut")
    monkeypatch.undo()
    assert set(_left_out(_file(tmp_path, "cut", 0))) == {"head.heads.1.weight", "head.heads.1.bias"}
    resumed, again = _train(over, "cut", resume=True)
    assert resumed["accuracy_matrix"] == record["accuracy_matrix"] and resumed["metrics"] == record["metrics"]
    assert _same(again.model.state_dict(), method.model.state_dict())
    assert _same(*(load_file(str(_file(tmp_path, n, 1))) for n in ("full", "cut")))


def _tamper_setup(monkeypatch) -> None:
    """The rebuilt model's second head differs after ``setup`` (the digests of the initial model still match)."""
    real = Finetune.setup

    def setup(self):
        real(self)
        with torch.no_grad():
            self.model.head.heads[1].weight.add_(1.0)

    monkeypatch.setattr(Finetune, "setup", setup, raising=False)


def test_a_rebuilt_tensor_that_differs_is_one_clear_error(tiny, tmp_path, monkeypatch):
    """Resumed on a model whose left-out tensor ``setup`` changed (after the initial digests, which still match), and
    exported from a checkpoint whose record does not match the rebuilt model: one RunError naming the tensor."""
    over = tiny(**{"method.name": "finetune"})
    _crash_after_first_task(monkeypatch)
    with pytest.raises(Crash):
        _train(over, "cut")
    monkeypatch.undo()
    _tamper_setup(monkeypatch)
    line = r"left out head\.heads\.1\.weight as equal to the model the run started from, but the model rebuilt now "
    with pytest.raises(RunError, match=line + r"differs; rebuild it from the run's weights file .*--weights FILE\)$"):
        _train(over, "cut", resume=True)
    monkeypatch.undo()
    first = _file(tmp_path, "cut", 0)
    with safe_open(str(first), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta[rd.LEFT_OUT]) | {"head.heads.1.weight": "0" * 64}
    save_file(load_file(str(first)), str(first), metadata=meta | {rd.LEFT_OUT: json.dumps(record)})
    with pytest.raises(RunError, match=line + "differs"):
        retain.export_run(tmp_path / "runs" / "cut", tmp_path / "a.safetensors")


def test_export_of_a_delta_checkpoint_equals_that_of_a_full_one(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(BlockExpansion, "checkpoint_state", Method.checkpoint_state)
    over = tiny(**EXPANSION)
    _, method = _train(over, "x")
    run_dir, last = tmp_path / "runs" / "x", _file(tmp_path, "x", 1)
    assert _left_out(last)
    retain.export_run(run_dir, tmp_path / "delta.safetensors")
    _old_style(last, method.checkpoint_state())
    retain.export_run(run_dir, tmp_path / "full.safetensors")
    delta, whole = (safe_open(str(tmp_path / f"{n}.safetensors"), "pt") for n in ("delta", "full"))
    assert delta.metadata() == whole.metadata()  # tensors_sha256 among them
    assert _same(*({k: f.get_tensor(k) for k in f.keys()} for f in (delta, whole)))


def test_an_old_style_full_checkpoint_still_resumes(tiny, tmp_path, monkeypatch):
    over = tiny(**{"method.name": "finetune"})
    record, method = _train(over, "full")
    _crash_after_first_task(monkeypatch)
    monkeypatch.setattr(rd, "unchanged", lambda tensors, initial: {})  # every tensor stored
    with pytest.raises(Crash):
        _train(over, "old")
    monkeypatch.undo()
    first = _file(tmp_path, "old", 0)
    _old_style(first, load_file(str(first)))
    with safe_open(str(first), "pt") as f:
        assert rd.LEFT_OUT not in f.metadata() and "head.heads.1.weight" in f.keys()
    resumed, again = _train(over, "old", resume=True)
    assert resumed["accuracy_matrix"] == record["accuracy_matrix"]
    assert _same(again.model.state_dict(), method.model.state_dict())
