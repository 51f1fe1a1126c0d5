import json

import pytest
import torch

from retain import engine
from retain.config import load_config
from retain.engine import RunError, build_run, build_schedule, run
from retain.engine.build import retention_datasets, seed_everything
from retain.engine.rundir import RunDir
from retain.features import weighted_knn_accuracy
from retain.methods.base import Stage
from retain.methods.finetune import Finetune

from conftest import interrupted_then_resumed

CPU = torch.device("cpu")


def _stacked(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, ...), labels (N,)) of a dataset of (image, label) pairs."""
    xs, ys = zip(*[data[i] for i in range(len(data))], strict=True)
    return torch.stack(xs), torch.tensor(ys)


def test_run_writes_config_metrics_and_checkpoints(tiny, tmp_path):
    cfg = load_config(None, tiny(name="r1", **{"train.tensorboard": "true"}))
    record = run(cfg, log=lambda *_: None)
    out = tmp_path / "runs" / "r1"
    assert (out / "config.yaml").exists() and list((out / "tb").iterdir())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["finished_tasks"] == 2 and len(saved["accuracy_matrix"]) == 2
    assert saved["accuracy_matrix"][0][1] is None
    assert saved["metrics"]["average_accuracy"] == pytest.approx(sum(saved["accuracy_matrix"][1]) / 2)
    assert saved["trainable_params"][0] > 0 and saved["bytes_per_task"][0] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task_001.safetensors"]  # keep_checkpoints=last
    assert record["accuracy_matrix"] == saved["accuracy_matrix"]


def test_existing_run_is_not_overwritten(tiny):
    cfg = load_config(None, tiny(name="r2"))
    run(cfg, log=lambda *_: None)
    with pytest.raises(RunError, match="already holds a run; continue it with --resume"):
        run(cfg, log=lambda *_: None)


@pytest.mark.parametrize("method", ["finetune", "linear_probe", "ewc", "lwf"])
def test_resume_after_interruption_gives_identical_results(tiny, monkeypatch, method):
    full, resumed = interrupted_then_resumed(tiny(**{"method.name": method}), monkeypatch)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


def test_resume_with_changed_config_is_refused(tiny):
    run(load_config(None, tiny(name="r3")), log=lambda *_: None)
    with pytest.raises(RunError, match="train.lr was 0.01, now 0.5"):
        run(load_config(None, tiny(name="r3", **{"train.lr": "0.5"})), resume=True, log=lambda *_: None)


def test_task_il_protocol_evaluates_within_the_task(tiny, tmp_path):
    """Task-IL records two views: TAw (the primary one: argmax within the evaluated task's classes, the task id given)
    and TAg (argmax over every class seen so far). Both are recomputed here from the checkpoint after each task."""
    # Three classes a task and Adam: each task is learnt, and after task 1 task 0's images go to task 1's classes
    # under TAg but not under TAw, so the views differ (a swap, or TAw over all seen classes or the wrong task's
    # slice, changes a value).
    opts = "{n_classes: 6, n_per_class: 12, n_test_per_class: 6, image_size: 16}"
    over = tiny(name="til", **{"scenario.protocol": "task_il", "method.name": "finetune", "data.options": opts,
                               "train.optimizer": "adam", "train.lr": "0.003", "train.epochs": "2",
                               "run.keep_checkpoints": "all"})  # fmt: skip
    rec = run(load_config(None, over), log=lambda *_: None)
    assert rec["protocol"] == "task_il" and rec["primary_view"] == "taw"
    assert set(rec["matrices"]) == {"taw", "tag"} and rec["accuracy_matrix"] == rec["matrices"]["taw"]
    seed_everything(load_config(None, over).seed)  # the run's initial model: what its checkpoints leave out
    scenario, method = build_run(load_config(None, over), CPU)  # to load each task's checkpoint into
    model = method.model.eval()  # finetune predicts with the model itself (every head; TAw and TAg slice it)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}  # what a checkpoint leaves out as unchanged
    taw, tag, differ = rec["matrices"]["taw"], rec["matrices"]["tag"], 0
    for t in range(scenario.n_tasks):
        saved = RunDir(tmp_path / "runs" / "til").load_checkpoint(f"checkpoints/task_{t:03d}.safetensors", fill=fresh)
        model.load_state_dict(saved)
        n_seen = scenario.seen_classes(t)
        for task in scenario.tasks[: t + 1]:
            x, y = _stacked(task.test)
            with torch.no_grad():
                logits = model(x)  # (N, C)
            lo, hi = task.offset, task.offset + task.n_classes
            within = logits[:, lo:hi].argmax(1) + lo  # TAw: the task's own classes
            over_seen = logits[:, :n_seen].argmax(1)  # TAg: every class seen after task t
            assert taw[t][task.index] == pytest.approx(100.0 * (within == y).sum().item() / len(y)), (t, task.index)
            assert tag[t][task.index] == pytest.approx(100.0 * (over_seen == y).sum().item() / len(y)), (t, task.index)
            assert taw[t][task.index] >= tag[t][task.index]  # right among all seen classes -> right within the task
            differ += (within != over_seen).sum().item()
    assert taw[0] == tag[0]  # one task seen: its classes are all the seen classes, the views coincide
    assert differ > 0, "the views predict alike on every test image: this setting no longer tells them apart"


def test_cosine_schedule_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = load_config(None, ["train.schedule=cosine", "train.warmup_steps=2", "train.min_lr=0.1"]).train
    sched = build_schedule(opt, cfg, steps_per_epoch=5, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.2 and lrs[-1] >= 0.1
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_stage_overrides_the_optimiser():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = load_config(None, ["train.optimizer=sgd", "train.lr=0.1"]).train
    opt = engine.build_optimizer([p], cfg, Stage("s", 1, [], lr=0.003, optimizer="adam"))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.003


def test_retention_knn_is_tracked(tiny, monkeypatch):
    """The probe scores the features the method deploys (``method.features``), not the bare model's: with
    Finetune's ``features`` replaced by a constant (every cosine 1, the k-NN vote decided by ties: 33 % on three
    balanced classes, where the tiny ViT's features score 100 %), each probe sends every retention image through it
    once and records the k-NN accuracy of those features."""
    calls = []

    def features(self, x):
        calls.append(len(x))
        return torch.ones(len(x), 8)

    monkeypatch.setattr(Finetune, "features", features)
    opts = "{n_classes: 3, n_per_class: 10, n_test_per_class: 5, image_size: 16, seed: 7}"
    over = tiny(name="ret", **{"method.name": "finetune", "data.retention.name": "synthetic",
                               "data.retention.options": opts})  # fmt: skip
    rec = run(load_config(None, over), log=lambda *_: None)
    assert len(rec["retention_knn"]) == 3  # before training and after each of 2 tasks
    assert sum(calls) == 3 * (3 * 10 + 3 * 5)  # each probe: the retention train and test images, once each
    cfg = load_config(None, over)
    scenario, _ = build_run(cfg, CPU)
    (_, y_train), (_, y_test) = map(_stacked, retention_datasets(cfg, scenario.tasks[0].test.base))
    r = cfg.data.retention
    ones = torch.ones(len(y_train), 8), torch.ones(len(y_test), 8)
    expected = weighted_knn_accuracy(ones[0], y_train, ones[1], y_test, r.k, r.temperature)
    assert rec["retention_knn"] == pytest.approx([expected] * 3)
