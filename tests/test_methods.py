"""Every registered method on a tiny 2-task stream: only its trainable parameters move, every one of them does,
outputs stay finite."""

import pytest
import torch

from retain.config import load_config
from retain.engine import RunContext, build_run, evaluate, fit_task
from retain.methods import method_names
from retain.methods.base import trainable_names

from conftest import CONFIT_CNN


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", method_names())
def test_method_trains_only_its_parameters(name, tiny):
    cfg = load_config(None, tiny(**{"method.name": name}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    ctx = RunContext(cfg.train, torch.device("cpu"))
    method.setup()
    for task in scenario.tasks:
        before = _snapshot(method.model)
        fit_task(method, task, ctx)
        allowed = set(trainable_names(method.model, method.trainable_prefixes(task)))
        after = method.model.state_dict()
        params = dict(method.model.named_parameters())
        for key, old in before.items():
            if key in params and key not in allowed:
                assert torch.equal(after[key], old), f"{name}: {key} changed but is not trainable in task {task.index}"
        x = torch.stack([task.test[i][0] for i in range(4)])
        logits = method.predict(x, None).logits
        seen = scenario.seen_classes(task.index)
        assert torch.isfinite(logits[:, :seen]).all()
        accs = evaluate(method, scenario, task.index, ctx).primary
        assert len(accs) == task.index + 1 and all(0 <= a <= 100 for a in accs)


# Tensors a method writes in closed form (not by gradient) during a task, so they change although no stage with a
# budget trains them: SimpleCIL's prototypes (the task's head; bias zeroed) and LN tuning's task key (``fit_key``).
CLOSED_FORM = {
    "simplecil": lambda t: [f"head.heads.{t}.weight", f"head.heads.{t}.bias"],
    "ln_tuning": lambda t: ["ln_keys"],
}

# Parameters a method trains that cannot move in the tiny setting, by method, each with the reason. None so far:
# LoRA's B starts at 0 (so A's first gradient is 0) and Block Expansion's new blocks start with zero outputs, but
# two epochs (6 steps a task) move both; keep this empty unless a parameter truly cannot move, and say why.
CANNOT_MOVE: dict[str, set[str]] = {}


@pytest.mark.parametrize("name", method_names())
def test_method_moves_every_parameter_it_trains(name, tiny):
    """The converse of ``test_method_trains_only_its_parameters``: every parameter some stage of the task trains
    (``method.trained_names(task)``) differs after the task from what it was when the stages began (after
    ``before_task``, which may write some itself: LN tuning copies the previous task's rows into the new task's)."""
    extra = {"method.name": name, "train.epochs": "2"}
    if name == "confit":  # 5 epochs run each hierarchical stage: head, head+bn (BatchNorm affines), all: (1, 1, 3)
        extra |= CONFIT_CNN | {"train.epochs": "5"}
    cfg = load_config(None, tiny(**extra))
    scenario, method = build_run(cfg, torch.device("cpu"))
    ctx = RunContext(cfg.train, torch.device("cpu"))
    method.setup()
    started: dict[str, torch.Tensor] = {}  # the parameters once the task is set up, before its first stage
    real_before_task = method.before_task

    def before_task(task):
        real_before_task(task)
        started.update({k: p.detach().clone() for k, p in method.model.named_parameters()})

    method.before_task = before_task
    for task in scenario.tasks:
        before, t = _snapshot(method.model), task.index
        started.clear()
        fit_task(method, task, ctx)
        assert started, f"{name}: fit_task did not call before_task"
        trained = [n for n in method.trained_names(task) if n not in CANNOT_MOVE.get(name, ())]
        if name == "simplecil":
            assert trained == [], "SimpleCIL trains nothing by gradient"
        else:
            assert trained, f"{name}: no parameter is trained in task {t}"
        params = dict(method.model.named_parameters())
        still = [n for n in trained if torch.equal(params[n].detach(), started[n])]
        assert not still, f"{name}: trained in task {t} but unchanged: {still}"
        state = method.model.state_dict()
        for key in CLOSED_FORM[name](t) if name in CLOSED_FORM else []:
            assert not torch.equal(state[key], before[key]), f"{name}: {key} is not written in task {t}"


@pytest.mark.parametrize("name", ["linear_probe", "simplecil"])
def test_frozen_backbone_methods_leave_backbone_bit_identical(name, tiny):
    cfg = load_config(None, tiny(**{"method.name": name}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    ctx = RunContext(cfg.train, torch.device("cpu"))
    for task in scenario.tasks:
        fit_task(method, task, ctx)
    for k, v in method.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_simplecil_prototypes_are_normalised_class_means(tiny):
    cfg = load_config(None, tiny(**{"method.name": "simplecil"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    task = scenario.tasks[0]
    fit_task(method, task, RunContext(cfg.train, torch.device("cpu")))
    xs, ys = zip(*[task.train_eval[i] for i in range(len(task.train_eval))], strict=True)
    with torch.no_grad():
        feats = method.model.eval().features(torch.stack(xs))
    ys = torch.tensor(ys)
    for c in task.labels:
        proto = torch.nn.functional.normalize(feats[ys == c].mean(0), dim=0)
        assert torch.allclose(method.model.head.heads[0].weight[c - task.offset], proto, atol=1e-5)


def test_joint_trains_on_all_tasks_so_far(tiny):
    cfg = load_config(None, tiny(**{"method.name": "joint"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    (stage,) = method.stages(scenario.tasks[1])
    assert len(stage.data()) == sum(len(t.train) for t in scenario.tasks) and stage.validate


def test_class_il_finetune_loss_masks_unseen_classes(tiny):
    cfg = load_config(None, tiny(**{"method.name": "finetune"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    method.model.head.n_active = 2
    method.before_task(scenario.tasks[0])
    logits = method.mask_logits(torch.zeros(3, 4))
    assert torch.isinf(logits[:, 2:]).all() and (logits[:, :2] == 0).all()
    method.cfg.train_mask = "current"
    method.before_task(scenario.tasks[1])
    logits = method.mask_logits(torch.zeros(3, 4))
    assert torch.isinf(logits[:, :2]).all() and (logits[:, 2:] == 0).all()
