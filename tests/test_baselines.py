import math

import pytest
import torch

from retain.config import ConfigError, load_config
from retain.engine import RunContext, build_run, fit_task, run
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
    method.model.set_seen(2)
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
    method.model.set_seen(2)
    method.before_task(scenario.tasks[1])
    x, y = next(iter(torch.utils.data.DataLoader(scenario.tasks[1].train, batch_size=4)))
    assert method.loss((x, y), None)["ewc"].item() == 0.0  # no change yet: no penalty
    with torch.no_grad():
        dict(method.model.backbone.named_parameters())[name].add_(0.1)
    assert method.loss((x, y), None)["ewc"].item() > 0.0


# ---- issue 15: fidelity fixes against FACIL ------------------------------------------------------------------------
def _fit_all(cfg, n_tasks=None):
    scenario, method = build_run(cfg, torch.device("cpu"))
    ctx = RunContext(cfg.train, torch.device("cpu"))
    method.setup()
    for task in scenario.tasks[:n_tasks]:
        fit_task(method, task, ctx)
    return scenario, method, ctx


def test_task_il_mask_keeps_each_samples_own_task(tiny):
    cfg = load_config(None, tiny(**{"method.name": "joint", "scenario.protocol": "task_il"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    method.before_task(scenario.tasks[1])
    logits = method.mask_logits(torch.zeros(3, 4), torch.tensor([0, 3, 1]))
    keep = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert (logits[keep] == 0).all() and torch.isinf(logits[~keep]).all()
    without_labels = method.mask_logits(torch.zeros(3, 4))  # callers without labels: the current task's classes
    assert torch.isinf(without_labels[:, :2]).all() and (without_labels[:, 2:] == 0).all()


def test_joint_task_il_trains_and_beats_finetune(tiny):
    common = {"scenario.protocol": "task_il", "train.epochs": "5", "train.optimizer": "adam", "train.lr": "0.003"}
    rec = {}
    for name in ("joint", "finetune"):
        # the engine stops with RunError on a non-finite loss (joint's old samples had a -inf target logit)
        cfg = load_config(None, tiny(name=name, **{"method.name": name}, **common))
        rec[name] = run(cfg, log=lambda *_: None)["metrics"]["average_accuracy"]
    assert rec["joint"] > rec["finetune"]


def test_joint_rejects_current_train_mask(tiny):
    with pytest.raises(ConfigError, match="train_mask=current with joint"):
        build_run(load_config(None, tiny(**{"method.name": "joint", "method.train_mask": "current"})))


def test_ewc_fisher_fuses_from_zeros(tiny):
    a = 0.3
    cfg = load_config(None, tiny(**{"method.name": "ewc", "method.alpha": str(a)}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    ctx = RunContext(cfg.train, torch.device("cpu"))
    method.setup()

    def fisher_now(task):  # F of the model as it is after ``task``, straight from diagonal_fisher
        method.model.backbone.requires_grad_(True)
        loader = method.loader(task.train_eval, cfg.method.fisher_batch_size)
        f = diagonal_fisher(method.model, loader, torch.device("cpu"), scenario.seen_classes(task.index))
        method.model.zero_grad(set_to_none=True)
        return f

    fit_task(method, scenario.tasks[0], ctx)
    f1 = fisher_now(scenario.tasks[0])
    for n, f in f1.items():  # FACIL: alpha * 0 + (1 - alpha) * F1, not F1
        assert torch.allclose(method.fisher[n], a * torch.zeros_like(f) + (1 - a) * f, rtol=1e-6, atol=0), n
    fit_task(method, scenario.tasks[1], ctx)
    f2 = fisher_now(scenario.tasks[1])
    assert any(f.sum() > 0 for f in f2.values())
    for n in f1:
        expected = a * (a * torch.zeros_like(f1[n]) + (1 - a) * f1[n]) + (1 - a) * f2[n]
        assert torch.allclose(method.fisher[n], expected, rtol=1e-6, atol=0), n


def test_ewc_facil_fisher_is_a_train_mode_pass_over_shuffled_full_batches(tiny):
    cfg = load_config(None, tiny(**{"method.name": "ewc", "method.fisher": "facil", "train.batch_size": "10"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    task, model = scenario.tasks[0], method.model
    method.setup()
    method.before_task(task)
    batches, modes = [], []
    real_loader = method.loader

    def recording_loader(data, batch_size=None):
        for batch in real_loader(data, batch_size):
            batches.append(batch)
            yield batch

    method.loader = recording_loader
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.eval()
    torch.manual_seed(0)
    fisher = method.estimate_fisher(task)
    hook.remove()
    assert modes == [True, True] and not model.training  # train mode during the pass, the mode restored after
    # 24 samples, batch 10: FACIL's len // batch = 2 full batches of a shuffled order, the partial batch skipped
    assert [len(x) for x, _ in batches] == [10, 10]
    images = torch.stack([task.train[i][0] for i in range(len(task.train))])
    picked = [int((images == x).flatten(1).all(1).nonzero()) for xb, _ in batches for x in xb]
    assert len(set(picked)) == 20 and picked != list(range(20))
    manual = {n: torch.zeros_like(p) for n, p in model.backbone.named_parameters()}
    model.train()
    for x, _ in batches:
        model.zero_grad()
        logits = model(x)[:, :2]
        torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
        for n, p in model.backbone.named_parameters():
            manual[n] += p.grad.pow(2) * len(x)
    for n, f in fisher.items():
        assert torch.allclose(f, manual[n] / 20, rtol=1e-5, atol=1e-12), n
    method.loader = real_loader
    torch.manual_seed(0)
    again = method.estimate_fisher(task)  # the seeded order makes the estimate deterministic
    assert all(torch.equal(again[n], f) for n, f in fisher.items())


def test_ewc_rejects_unknown_fisher(tiny):
    with pytest.raises(ConfigError, match="method.fisher='exact'"):
        build_run(load_config(None, tiny(**{"method.name": "ewc", "method.fisher": "exact"})))


def test_finetune_current_mask_freezes_old_heads(tiny):
    cfg = load_config(None, tiny(**{"method.name": "finetune", "method.train_mask": "current"}))
    scenario, method, ctx = _fit_all(cfg, n_tasks=1)
    old_head = {k: v.clone() for k, v in method.model.head.heads[0].state_dict().items()}
    backbone = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    assert not any(n.startswith("head.heads.0.") for n in method.trained_names(scenario.tasks[1]))
    fit_task(method, scenario.tasks[1], ctx)
    for k, v in method.model.head.heads[0].state_dict().items():
        assert torch.equal(v, old_head[k]), k  # bit-identical: not even handed to the optimiser
    assert any(not torch.equal(v, backbone[k]) for k, v in method.model.backbone.state_dict().items())
    # the CE ignores old classes: moving the old head's logits leaves the loss unchanged
    x, y = next(iter(torch.utils.data.DataLoader(scenario.tasks[1].train, batch_size=6)))
    before = method.loss((x, y), None)["ce"]
    with torch.no_grad():
        method.model.head.heads[0].bias.add_(5.0)
    assert torch.equal(method.loss((x, y), None)["ce"], before)
    # the default (seen) still trains every seen head over all seen classes
    cfg = load_config(None, tiny(**{"method.name": "finetune"}))
    scenario, method, _ = _fit_all(cfg, n_tasks=1)
    assert any(n.startswith("head.heads.0.") for n in method.trained_names(scenario.tasks[1]))
