"""The engine's seams: stage budgets and positions, validation, accuracy views, run state, inspect == run."""

import json
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from retain.config import ConfigError, TrainConfig, load_config
from retain.data.scenarios import Scenario, Task
from retain.engine import RunContext, StageLoop, build_run, evaluate, fit_task, run, seed_everything
from retain.engine.rundir import RunState
from retain.features import weighted_knn_accuracy
from retain.inspect import inspect_config
from retain.methods import method_names
from retain.methods.base import Method, MethodConfig, Prediction

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ stage loop


def test_step_budget_takes_exactly_that_many_steps(tiny):
    cfg = load_config(None, tiny(**{"train.steps": "4", "train.epochs": "99"}))
    scenario, method = build_run(cfg, CPU)
    ctx = RunContext(cfg.train, CPU)
    fit_task(method, scenario.tasks[0], ctx)  # 24 images, batch 8: 3 steps per epoch -> 1 epoch + 1 step
    assert ctx.step == 4
    assert [h["epoch"] for h in ctx.history] == [0, 1]


def _stage_run(tiny, state=None, stop_after=None, weights=None):
    over = tiny(**{"train.epochs": "3", "train.optimizer": "adam", "train.lr": "0.01", "data.augment": "crop_flip",
                   "train.schedule": "cosine", "train.warmup_steps": "2"})  # fmt: skip
    cfg = load_config(None, over)
    seed_everything(0)
    scenario, method = build_run(cfg, CPU)
    if weights is not None:
        method.model.load_state_dict(weights)
    task = scenario.tasks[0]
    loop = StageLoop(method, task, method.stages(task)[0], RunContext(cfg.train, CPU), 0)
    seed_everything(3)
    if state is not None:
        loop.load_state_dict(state)
    saved = {}

    def after_step(lp):
        if lp.pos.step == stop_after:
            saved["state"] = lp.state_dict()
            saved["weights"] = {k: v.clone() for k, v in method.model.state_dict().items()}
            raise KeyboardInterrupt

    try:
        loop.run(after_step)
    except KeyboardInterrupt:
        return saved
    return method.model.state_dict()


@pytest.mark.parametrize("stop_after", [4, 6])  # mid-epoch (epoch 1, batch 1) and at an epoch boundary
def test_stage_position_restores_exactly(tiny, stop_after):
    full = _stage_run(tiny)
    cut = _stage_run(tiny, stop_after=stop_after)
    assert cut["state"]["position"]["step"] == stop_after
    resumed = _stage_run(tiny, state=cut["state"], weights=cut["weights"])
    for k, v in full.items():
        assert torch.equal(v, resumed[k]), k


def test_plateau_schedule_with_a_validation_split_runs_and_logs_val_loss(tiny):
    over = tiny(name="plateau", **{"train.schedule": "plateau", "scenario.val_fraction": "0.25", "train.epochs": "3",
                                   "train.patience": "1"})  # fmt: skip
    cfg = load_config(None, over)
    scenario, method = build_run(cfg, CPU)
    assert len(scenario.tasks[0].val) == 6 and len(scenario.tasks[0].train) == 18
    ctx = RunContext(cfg.train, CPU)
    fit_task(method, scenario.tasks[0], ctx)
    assert all("val_loss" in h for h in ctx.history) and len(ctx.history) >= 1


def test_plateau_without_validation_is_one_clear_error_before_training(tiny):
    cfg = load_config(None, tiny(**{"train.schedule": "plateau"}))
    with pytest.raises(ConfigError, match="scenario.val_fraction"):
        build_run(cfg, CPU)
    cfg.train.schedule = "constant"
    scenario, method = build_run(cfg, CPU)
    cfg.train.schedule = "plateau"  # a stage without validation data still stops with the same message
    with pytest.raises(ConfigError, match="scenario.val_fraction"):
        fit_task(method, scenario.tasks[0], RunContext(cfg.train, CPU))


# ------------------------------------------------------------------------------------------------ accuracy views


class _LogitsAreInputs(Method):
    """predict(x) = x: the test images are the logits, so every view can be computed by hand."""

    def __init__(self, scenario, task_aware=False):
        super().__init__(MethodConfig(), nn.Identity(), scenario, TrainConfig())
        self.task_aware_predict = task_aware
        self.calls, self.hooks = [], []

    def predict(self, x, task_id=None):
        self.calls.append(task_id)
        return Prediction(-x if (self.task_aware_predict and task_id is None) else x)

    @contextmanager
    def deployed(self):
        self.hooks.append("deployed")
        yield
        self.hooks.append("training")


def _hand_scenario(protocol):
    t0 = TensorDataset(torch.tensor([[2.0, 1, 3, 0], [0, 1, 0, 0], [0, 1, 0, 0]]), torch.tensor([0, 1, 0]))
    t1 = TensorDataset(torch.tensor([[5.0, 0, 1, 0], [0, 0, 0, 1]]), torch.tensor([2, 3]))
    tasks = [Task(0, [0, 1], 0, t0, t0, t0), Task(1, [2, 3], 2, t1, t1, t1)]
    return Scenario(protocol, tasks, [0, 1, 2, 3])


def test_task_aware_and_task_agnostic_views_by_hand():
    scenario = _hand_scenario("task_il")
    method, ctx = _LogitsAreInputs(scenario), RunContext(TrainConfig(), CPU)
    ev = evaluate(method, scenario, 0, ctx)  # after task 0 only classes 0, 1 are seen
    assert ev.accuracy["taw"] == pytest.approx([200 / 3]) and ev.accuracy["tag"] == pytest.approx([200 / 3])
    ev = evaluate(method, scenario, 1, ctx)
    # task 0: TAw right on samples 1, 2; TAg (argmax over 4) only on sample 2. Task 1: TAw both; TAg the second.
    assert ev.accuracy["taw"] == pytest.approx([200 / 3, 100.0]) and ev.accuracy["tag"] == pytest.approx([100 / 3, 50])
    assert ev.primary == ev.accuracy["taw"] and ev.task_id is None and ev.seconds > 0
    assert method.hooks == ["deployed", "training"] * 2 and set(method.calls) == {0, 1}


def test_class_il_view_and_a_task_aware_predict_gets_a_second_pass():
    scenario = _hand_scenario("class_il")
    ev = evaluate(_LogitsAreInputs(scenario), scenario, 1, RunContext(TrainConfig(), CPU))
    assert list(ev.accuracy) == ["class_il"] and ev.accuracy["class_il"] == pytest.approx([100 / 3, 50])
    scenario = _hand_scenario("task_il")
    method = _LogitsAreInputs(scenario, task_aware=True)
    ev = evaluate(method, scenario, 1, RunContext(TrainConfig(), CPU))
    assert None in method.calls  # TAg asks without the task id; the method negates its logits then
    # negated logits, argmax over 4: task 0 -> 3, 0, 0 (first max) for labels 0, 1, 0: one right; task 1 -> 1, 0
    assert ev.accuracy["taw"] == pytest.approx([200 / 3, 100.0]) and ev.accuracy["tag"] == pytest.approx([100 / 3, 0])


def test_metrics_json_holds_seed_views_and_eval_time(tiny, tmp_path):
    rec = run(load_config(None, tiny(name="views", seed="3", **{"scenario.protocol": "task_il"})), log=lambda *_: 0)
    saved = json.loads((tmp_path / "runs" / "views" / "metrics.json").read_text())
    assert saved["seed"] == 3 and set(saved["matrices"]) == {"taw", "tag"} and saved["primary_view"] == "taw"
    assert saved["accuracy_matrix"] == saved["matrices"]["taw"] == rec["accuracy_matrix"]
    assert len(saved["eval_time_s"]) == 2 and all(t > 0 for t in saved["eval_time_s"])
    assert set(saved["metrics_by_view"]) == {"taw", "tag"}
    assert saved["metrics"] == saved["metrics_by_view"]["taw"]


def test_run_state_written_before_named_views_still_loads():
    old = {"finished_tasks": 1, "rows": [[50.0]], "task_ids": [None], "checkpoint": "checkpoints/task_000.safetensors"}
    state = RunState.from_dict(old, "task_il")
    assert state.matrices == {"taw": [[50.0]]} and state.rows == [[50.0]] and state.finished_tasks == 1


# ------------------------------------------------------------------------------------------------ methods' seams


@pytest.mark.parametrize("name", method_names())
def test_inspect_counts_exactly_what_the_run_trains(name, tiny, tmp_path):
    over = tiny(name=f"count-{name}", **{"method.name": name, "data.num_classes": "4"})
    info = inspect_config(load_config(None, over))
    rec = run(load_config(None, over), log=lambda *_: 0)
    assert [info["trainable_params"], info["trainable_params_last_task"]] == rec["trainable_params"]
    if name == "simplecil":
        assert rec["trainable_params"] == [0, 0]  # prototypes are written in closed form, never trained


def test_extra_passes_use_the_engine_loader(tiny):
    cfg = load_config(None, tiny(**{"method.name": "ewc"}))
    scenario, method = build_run(cfg, CPU)
    method.setup()
    ctx = RunContext(cfg.train, CPU)
    used = []
    real = ctx.pass_loader
    ctx.pass_loader = lambda data, bs: used.append(bs) or real(data, bs)
    fit_task(method, scenario.tasks[0], ctx)
    assert used == [method.cfg.fisher_batch_size]  # the Fisher pass


def test_method_to_moves_the_modules_it_holds(tiny):
    cfg = load_config(None, tiny(**{"method.name": "ln_tuning", "method.query_model": "copy"}))
    _, method = build_run(cfg, CPU)
    method.to("meta")
    assert method.device == torch.device("meta")
    assert next(method.query_model.parameters()).device.type == "meta"
    assert next(method.model.parameters()).device.type == "meta"


def test_weighted_knn_by_hand():
    train = torch.tensor([[1.0, 0], [0.8, 0.6], [0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    # query (1, 0): cosines 1, 0.8, 0 -> k=2 neighbours: class 0 weight e^(1/T), class 1 weight e^(0.8/T) -> class 0
    assert weighted_knn_accuracy(train, labels, torch.tensor([[1.0, 0]]), torch.tensor([0]), k=2) == 100.0
    # k=3, T=10: weights e^0.1 (class 0) vs e^0.08 + e^0 (class 1) -> class 1
    assert weighted_knn_accuracy(train, labels, torch.tensor([[1.0, 0]]), torch.tensor([0]), k=3, temperature=10) == 0
