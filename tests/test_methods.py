"""Every registered method on a tiny 2-task stream: only its trainable parameters move, outputs stay finite."""

import pytest
import torch

from retain.config import load_config
from retain.engine import RunContext, build_run, evaluate, fit_task
from retain.methods import method_names
from retain.methods.base import trainable_names


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
        out = method.predict(x, None)
        logits = out[0] if isinstance(out, tuple) else out
        seen = scenario.seen_classes(task.index)
        assert torch.isfinite(logits[:, :seen]).all()
        accs = evaluate(method, scenario, task.index, ctx).primary
        assert len(accs) == task.index + 1 and all(0 <= a <= 100 for a in accs)


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
    assert len(method.train_dataset(scenario.tasks[1])) == sum(len(t.train) for t in scenario.tasks)


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
