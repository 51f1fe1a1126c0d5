"""``train.sync_every``: the training loop keeps each step's values on the device and reads them on the host every
N steps (retain.engine.stages.StageLoop.sync), with the same results, the same epoch means and TensorBoard values,
a non-finite loss still stopping the run naming its step, and no checkpoint of the steps after it."""

import sys

import pytest
import torch

from retain.config import load_config
from retain.engine import checkpoint, run
from retain.engine.context import NonFiniteLoss
from retain.engine.loop import train
from retain.methods.finetune import Finetune

SAMPLERS = ("retain/engine/loading.py", "torch/utils/data/")  # draws from the CPU generator: never on a device


def _host_reads(monkeypatch) -> dict[str, int]:
    """Count the calls that copy a tensor's value to the host (each one a host-device sync on a GPU), but the
    samplers' draws from their CPU generator."""
    counts = {"reads": 0}
    for name in ("item", "tolist", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            counts["reads"] += not caller.endswith(SAMPLERS[0]) and SAMPLERS[1] not in caller
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def _train_reads(tiny, monkeypatch, sync_every: int) -> tuple[int, int]:
    """(host reads inside the training epochs, optimiser steps) of a 2-task fine-tuning run, 12 steps a task."""
    from retain.engine import stages

    over = tiny(name=f"s{sync_every}", **{"train.batch_size": "2", "train.sync_every": str(sync_every)})
    counts, steps = _host_reads(monkeypatch), {"reads": 0, "steps": 0}
    real_epoch = stages.StageLoop.train_epoch

    def epoch(self, *args, **kwargs):
        before, first = counts["reads"], self.pos.step
        out = real_epoch(self, *args, **kwargs)
        steps["reads"] += counts["reads"] - before
        steps["steps"] += self.pos.step - first
        return out

    monkeypatch.setattr(stages.StageLoop, "train_epoch", epoch)
    run(load_config(None, over), log=lambda *_: None)
    return steps["reads"], steps["steps"]


def test_host_reads_once_per_sync_every_steps(tiny, monkeypatch):
    """Fine-tuning, one process: every step read the loss's finiteness, its term and the loss again (3 reads a
    step); now one read per train.sync_every steps and one at each epoch's end."""
    reads, steps = _train_reads(tiny, monkeypatch, 10)
    assert steps == 24  # 2 tasks x 12 steps (24 images of a task's 2 classes, batch 2)
    assert reads == 2 * 2  # per task: at step 10 and at the epoch's end (step 12)
    reads_every_step, _ = _train_reads(tiny, monkeypatch, 1)
    assert reads_every_step == steps


def test_same_results_history_and_tensorboard_whatever_sync_every(tiny, tmp_path):
    """train.sync_every changes when the host reads, not what is computed: bit-identical weights, the same epoch
    means in the history and the same TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records, models, scalars, history = [], [], [], []
    for every in (1, 7):
        over = tiny(name=f"e{every}", **{"method.name": "lwf", "train.sync_every": str(every),
                                         "train.tensorboard": "true", "train.batch_size": "4"})  # fmt: skip
        record, method = train(load_config(None, over), log=lambda *_: None)
        records.append(record)
        models.append(method.model.state_dict())
        history.append(method.ctx.history)
        events = EventAccumulator(str(tmp_path / "runs" / f"e{every}" / "tb"))
        events.Reload()
        scalars.append({tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
                        if tag.startswith(("loss/", "lr"))})  # fmt: skip
    assert records[0]["accuracy_matrix"] == records[1]["accuracy_matrix"]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert history[0] == history[1] and history[0]
    assert scalars[0] == scalars[1] and {"loss/ce", "loss/kd", "lr"} <= set(scalars[0])
    assert [step for step, _ in scalars[0]["loss/ce"]] == [0, 10]  # every 10th of the 12 steps (log_every)


def test_a_nan_between_reads_names_its_step_and_nothing_after_it_is_saved(tiny, tmp_path, monkeypatch):
    """The loss turns NaN at step 7 of a task; the host reads at step 10 (train.sync_every=10) and stops naming
    step 7; the mid-task checkpoint due at step 10 (run.checkpoint_every=5) is not written: step 5's is kept."""
    real_loss, calls = Finetune.loss, {"n": 0}

    def loss(self, batch, stage):
        calls["n"] += 1
        terms = real_loss(self, batch, stage)
        return {k: v * float("nan") for k, v in terms.items()} if calls["n"] == 7 else terms

    monkeypatch.setattr(Finetune, "loss", loss)
    over = tiny(name="nan", **{"train.batch_size": "2", "train.sync_every": "10", "run.checkpoint_every": "5"})
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 7 \(task 0, stage 'train', epoch 1, batch 7\)"):
        run(load_config(None, over), log=lambda *_: None)
    mid = checkpoint.read_midtask(tmp_path / "runs" / "nan")
    assert mid is not None and mid.step == 5
    assert all(torch.isfinite(v).all() for v in mid.method.values() if v.is_floating_point())
