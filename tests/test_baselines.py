import math

import torch

from retain.config import load_config
from retain.engine import RunContext, build_run, fit_task
from retain.methods.ewc import diagonal_fisher
from retain.methods.lwf import distillation_loss


def test_distillation_loss_by_hand():
    new = torch.tensor([[0.0, 2.0]])
    old = torch.tensor([[2.0, 0.0]])
    # T = 2: p_old = softmax([1, 0]), p_new = softmax([0, 1]) smoothed by 1e-5/2 and renormalised
    e = math.e
    p_old = [e / (e + 1), 1 / (e + 1)]
    p_new = [1 / (e + 1) + 0.5e-5, e / (e + 1) + 0.5e-5]
    s = sum(p_new)
    expected = -(p_old[0] * math.log(p_new[0] / s) + p_old[1] * math.log(p_new[1] / s))
    assert distillation_loss(new, old, 2.0).item() == torch.tensor(expected).float().item()


def test_lwf_distils_only_from_the_second_task(tiny):
    cfg = load_config(None, tiny(**{"method.name": "lwf"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    ctx = RunContext(cfg.train, torch.device("cpu"))
    method.setup()
    x, y = next(iter(torch.utils.data.DataLoader(scenario.tasks[0].train, batch_size=4)))
    fit_task(method, scenario.tasks[0], ctx)
    method.model.head.n_active = 2
    method.before_task(scenario.tasks[1])
    terms = method.loss((x, y + 2), None)
    assert set(terms) == {"ce", "kd"} and terms["kd"].item() > 0
    # the frozen copy equals the model right after task 0, so the KD targets are its own old-head outputs
    with torch.no_grad():
        assert torch.equal(method.old_model(x)[:, :2], method.model(x)[:, :2])


def test_ewc_fisher_by_hand_and_penalty(tiny):
    cfg = load_config(None, tiny(**{"method.name": "ewc"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    method.setup()
    model = method.model
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    xs = torch.stack([scenario.tasks[0].train_eval[i][0] for i in range(3)])
    # one sample per batch: the estimate is the mean of per-sample squared gradients (computed by hand below)
    loader = [(xs[i : i + 1], torch.zeros(1, dtype=torch.long)) for i in range(3)]
    fisher = diagonal_fisher(model, loader, torch.device("cpu"), n_seen=2)
    name = "blocks.0.mlp.fc2.weight"
    param = dict(model.backbone.named_parameters())[name]
    manual = torch.zeros_like(param)
    model.eval()
    for i in range(3):
        model.zero_grad()
        logits = model(xs[i : i + 1])[:, :2]
        torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
        manual += param.grad.pow(2)
    assert torch.allclose(fisher[name], manual / 3, atol=1e-9)
    assert fisher[name].sum() > 0
    ctx = RunContext(cfg.train, torch.device("cpu"))
    fit_task(method, scenario.tasks[0], ctx)
    method.model.head.n_active = 2
    method.before_task(scenario.tasks[1])
    x, y = next(iter(torch.utils.data.DataLoader(scenario.tasks[1].train, batch_size=4)))
    assert method.loss((x, y), None)["ewc"].item() == 0.0  # no change yet: no penalty
    with torch.no_grad():
        dict(method.model.backbone.named_parameters())[name].add_(0.1)
    assert method.loss((x, y), None)["ewc"].item() > 0.0
