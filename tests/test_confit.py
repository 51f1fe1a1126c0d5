"""ConFiT (Jie et al. 2022): Xconv BN mean recovery, input trackers, per-task BN state, hierarchical schedule."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from retain.cli import main
from retain.config import load_config
from retain.engine import RunContext, build_run, evaluate, fit_stage, fit_task
from retain.methods.base import trainable_names
from retain.methods.confit import hierarchical_epochs, sync_batchnorm
from retain.models import create_backbone
from retain.models.xconv_bn import InputMeanTracker, XconvBN, conv_bn_pairs, phase_map, recover_mean

from conftest import CONFIT_CNN, interrupted_then_resumed

CNN = CONFIT_CNN | {"method.name": "confit"}


def _direct_mean(conv: nn.Conv2d, mu: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Build the constant / phase map pixel by pixel and run the conv module itself."""
    mu = mu.reshape(-1, conv.in_channels)
    grid = torch.empty(1, conv.in_channels, *size)
    for h in range(size[0]):
        for w in range(size[1]):
            grid[0, :, h, w] = mu[0] if len(mu) == 1 else mu[2 * (h % 2) + (w % 2)]
    with torch.no_grad():
        return conv(grid).mean(dim=(0, 2, 3))


STRIDED = [(3, 2, 1, (8, 8)), (3, 2, 1, (7, 9)), (1, 2, 0, (8, 6)), (7, 2, 3, (12, 12))]
CASES = [(1, 1, 0, (6, 6), 1), (3, 1, 1, (6, 5), 1)] + [(*c, p) for c in STRIDED for p in (1, 4)]


@pytest.mark.parametrize("kernel,stride,padding,size,phases", CASES)
def test_recover_mean_equals_the_conv_of_the_constant_map(kernel, stride, padding, size, phases):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride, padding, bias=False)
    mu = torch.randn(phases, 3) if phases == 4 else torch.randn(3)
    got = recover_mean(conv, mu, size)
    assert got.shape == (5,)
    torch.testing.assert_close(got, _direct_mean(conv, mu, size), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", [1, 3])
def test_without_padding_the_recovered_mean_is_the_weighted_sum(kernel):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, kernel, 1, 0, bias=False)
    mu = torch.randn(4)
    expected = conv.weight.sum(dim=(2, 3)) @ mu  # sum_{c,kh,kw} W[o,c,kh,kw] mu[c]
    torch.testing.assert_close(recover_mean(conv, mu, (9, 9)), expected, rtol=1e-5, atol=1e-6)
    conv.bias = nn.Parameter(torch.randn(6))
    torch.testing.assert_close(recover_mean(conv, mu, (9, 9)), expected + conv.bias, rtol=1e-5, atol=1e-6)


def test_strided_1x1_conv_sees_only_the_even_even_phase():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 3, 1, 2, 0, bias=False)
    mu = torch.randn(4, 4)
    torch.testing.assert_close(recover_mean(conv, mu, (8, 8)), conv.weight[:, :, 0, 0] @ mu[0], rtol=1e-5, atol=1e-6)


def test_phase_map_order():
    mu = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # (even,even), (even,odd), (odd,even), (odd,odd)
    grid = phase_map(mu, (3, 4))[0, 0]
    assert grid.tolist() == [[1, 2, 1, 2], [3, 4, 3, 4], [1, 2, 1, 2]]
    assert phase_map(torch.tensor([5.0, 6.0]), (2, 3)).shape == (1, 2, 2, 3)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3)])
def test_tracker_and_recovery_reproduce_the_bn_running_mean(kernel, stride, padding):
    """For inputs that repeat with the stride's period, conv and EMA are linear, so recovery is exact."""
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(3, 4, kernel, stride, padding, bias=False), nn.BatchNorm2d(4)
    tracker = InputMeanTracker(3, conv.stride, n_tasks=1)
    conv.register_forward_pre_hook(tracker.hook)
    net = nn.Sequential(conv, bn).train()
    for _ in range(5):
        per_phase = torch.randn(6, 3, stride, stride) + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
        net(per_phase.repeat(1, 1, 6 // stride, 6 // stride)[:, :, :5, :5])  # (6, 3, 5, 5), odd size on purpose
    assert tracker.size.tolist() == [5, 5] and tracker.mean.shape == (stride * stride, 3)
    torch.testing.assert_close(recover_mean(conv, tracker.mean, (5, 5)), bn.running_mean, rtol=1e-4, atol=1e-5)
    before = tracker.mean.clone()
    net.eval()(torch.randn(2, 3, 5, 5))
    assert torch.equal(tracker.mean, before), "trackers must not move in eval mode"


def _dataflow_pairs(model: nn.Module, size: int) -> set[tuple[str, str]]:
    """(conv, bn) where the BN's input tensor *is* the conv's output, found by running the model."""
    produced, pairs, handles = {}, set(), []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda _m, _i, out, n=name: produced.__setitem__(id(out), n)))
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(lambda _m, args, n=name: pairs.add((produced[id(args[0])], n))))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return pairs


@pytest.mark.parametrize("name,size,n_pairs", [("resnet18", 64, 20), ("cifar_resnet20", 32, 19)])
def test_conv_bn_pairs_follow_the_data_flow(name, size, n_pairs):
    model = create_backbone(name, pretrained=False)
    pairs = conv_bn_pairs(model)
    assert len(pairs) == n_pairs and set(pairs) == _dataflow_pairs(model, size)


def test_resnet18_storage_per_task_matches_the_paper_code():
    xbn = XconvBN(create_backbone("resnet18", pretrained=False), n_tasks=2)
    assert xbn.values_per_task == 4 * 4800 + 6540
    strided = {k: t.mean.shape[0] for k, t in xbn.trackers.items() if t.mean.shape[0] == 4}
    assert sorted(strided) == sorted(
        ["conv1"] + [f"layer{i}_0_{c}" for i in (2, 3, 4) for c in ("conv1", "downsample_0")]
    )


def test_xconv_bn_accepts_a_backbone_converted_to_sync_batchnorm():
    """SyncBatchNorm (ConFiT on several CUDA processes) is not a BatchNorm2d subclass: pairs and storage stay."""
    backbone = create_backbone("resnet18", pretrained=False)
    pairs = conv_bn_pairs(backbone)
    assert sync_batchnorm(backbone) == 20 and conv_bn_pairs(backbone) == pairs
    assert XconvBN(backbone, n_tasks=2).values_per_task == 4 * 4800 + 6540


def test_hierarchical_schedule_trains_exactly_the_named_parameters(tiny):
    cfg = load_config(None, tiny(**CNN, **{"train.epochs": "5"}))
    scenario, method = build_run(cfg, torch.device("cpu"))
    ctx = RunContext(cfg.train, torch.device("cpu"))
    task = scenario.tasks[1]
    method.before_task(task)
    stages = method.stages(task)
    assert [(s.name, s.epochs) for s in stages] == [("head", 1), ("head+bn", 1), ("all", 3)]
    params = dict(method.model.named_parameters())
    bn_params = {n for n in params if ".bn" in n}
    head = {"head.heads.1.weight", "head.heads.1.bias"}
    expected = [head, head | bn_params, head | {n for n in params if n.startswith("backbone.")}]
    for stage, names in zip(stages, expected, strict=True):
        assert set(trainable_names(method.model, stage.params)) == names, stage.name
        before = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
        fit_stage(method, task, stage, ctx)
        after = method.model.state_dict()
        changed = {n for n in params if not torch.equal(before[n], after[n])}
        assert changed == names, stage.name
        bn_mean = "backbone.layer1.0.bn1.running_mean"
        assert not torch.equal(before[bn_mean], after[bn_mean]), f"BN must stay in train mode in {stage.name}"
    flat = load_config(None, tiny(**CNN, **{"train.epochs": "5", "method.hierarchical": "false"}))
    _, flat_method = build_run(flat, torch.device("cpu"))
    assert [(s.name, s.epochs) for s in flat_method.stages(task)] == [("all", 5)]


def _official_per_epoch(max_epoch: int) -> list[frozenset[str]]:
    """The trainable groups of each epoch, replaying JieShibo/ConFiT main.py:76-90 (requires_grad set at the start
    of an epoch and kept until changed): ``if epoch == 0: fc only; elif epoch == max_epoch // 5: + bn (names with
    'bn' or 'downsample.1'); elif epoch == max_epoch // 2: all``."""
    trainable: set[str] = set()
    per_epoch = []
    for epoch in range(max_epoch):
        if epoch == 0:
            trainable = {"fc"}
        elif epoch == max_epoch // 5:
            trainable = trainable | {"bn"}
        elif epoch == max_epoch // 2:
            trainable = {"fc", "bn", "rest"}
        per_epoch.append(frozenset(trainable))
    return per_epoch


def _official_stages(max_epoch: int) -> list[tuple[str, int, frozenset[str]]]:
    """The official per-epoch sets, run-length encoded as (stage name, epochs, groups)."""
    names = {frozenset({"fc"}): "head", frozenset({"fc", "bn"}): "head+bn", frozenset({"fc", "bn", "rest"}): "all"}
    runs: list[tuple[str, int, frozenset[str]]] = []
    for groups in _official_per_epoch(max_epoch):
        if runs and runs[-1][2] == groups:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, groups)
        else:
            runs.append((names[groups], 1, groups))
    return runs


def test_hierarchical_stages_reproduce_the_official_per_epoch_rule(tiny):
    cfg = load_config(None, tiny(**CNN))
    scenario, method = build_run(cfg, torch.device("cpu"))
    task = scenario.tasks[1]
    method.before_task(task)
    params = [n for n, _ in method.model.named_parameters()]
    bn = {n for n in params if ".bn" in n}  # the CIFAR ResNet-20 has no downsample BN
    group_names = {
        "fc": {"head.heads.1.weight", "head.heads.1.bias"},
        "bn": bn,
        "rest": {n for n in params if n.startswith("backbone.")} - bn,
    }
    for epochs in range(1, 11):
        method.train_cfg = replace(cfg.train, epochs=epochs)
        stages = method.stages(task)
        official = _official_stages(epochs)
        assert [(s.name, s.epochs) for s in stages] == [(name, n) for name, n, _ in official], epochs
        for stage, (_, _, groups) in zip(stages, official, strict=True):
            expected = set().union(*(group_names[g] for g in groups))
            assert set(trainable_names(method.model, stage.params)) == expected, (epochs, stage.name)
        assert sum(hierarchical_epochs(epochs)) == epochs
    small = {
        1: [("head", 1)],
        2: [("head", 1), ("all", 1)],
        3: [("head", 1), ("all", 2)],
        4: [("head", 2), ("all", 2)],
    }
    for epochs, table in small.items():  # E < 5: no BN stage; the head alone for E//2 epochs (E = 1: 1 epoch)
        method.train_cfg = replace(cfg.train, epochs=epochs)
        assert [(s.name, s.epochs) for s in method.stages(task)] == table


def _train_two_tasks(tiny, **extra):
    cfg = load_config(None, tiny(**{**CNN, "train.epochs": "2", "train.lr": "0.05", **extra}))
    torch.manual_seed(0)
    scenario, method = build_run(cfg, torch.device("cpu"))
    ctx = RunContext(cfg.train, torch.device("cpu"))
    method.setup()
    for task in scenario.tasks:
        fit_task(method, task, ctx)
        evaluate(method, scenario, task.index, ctx)
    return scenario, method, ctx


def test_old_task_gets_its_bn_state_and_the_current_task_is_left_unchanged(tiny):
    scenario, method, ctx = _train_two_tasks(tiny)
    model, xbn = method.model, method.xbn
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(4)])
    current_logits = model.eval()(x)

    method.predict(x, 0)  # old task: task 0's affine and variance, means recovered through the current convs
    bb = model.backbone
    saved = xbn.bns["layer2_0_bn1"].saved[0]  # (4, C)
    assert torch.equal(bb.layer2[0].bn1.weight, saved[0]) and torch.equal(bb.layer2[0].bn1.running_var, saved[3])
    tracker = xbn.trackers["layer2_0_conv1"]
    assert torch.equal(tracker.mean, tracker.saved[0])
    torch.testing.assert_close(bb.layer2[0].bn1.running_mean, recover_mean(bb.layer2[0].conv1, tracker.mean, (8, 8)))
    assert not torch.equal(bb.layer2[0].bn1.running_mean, saved[2]), "the old task's means should be recovered"
    checkpoint = method.checkpoint_state()  # the current task's state, read without routing it back in
    assert checkpoint.keys() == state.keys() and all(torch.equal(checkpoint[k], v) for k, v in state.items())
    assert torch.equal(bb.layer2[0].bn1.weight, saved[0])  # no side effect: task 0's state is still in place

    evaluate(method, scenario, 1, ctx)  # task 0 then task 1: back at the current task's state
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(method.predict(x, 1).logits, current_logits)
    assert torch.equal(method.predict(x, None).logits, current_logits)


def test_without_xconv_bn_and_hierarchy_confit_is_finetune(tiny):
    _, confit, _ = _train_two_tasks(tiny, **{"method.xconv_bn": "false", "method.hierarchical": "false"})
    _, finetune, _ = _train_two_tasks(tiny, **{"method.name": "finetune"})
    assert not hasattr(confit.model, "xbn")
    for (k, a), (_, b) in zip(confit.model.state_dict().items(), finetune.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_resume_gives_identical_results(tiny, monkeypatch):
    full, resumed = interrupted_then_resumed(tiny(**CNN, **{"train.epochs": "2"}), monkeypatch)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


def test_inspect_cifar100_preset_reports_the_resnet18_storage(capsys):
    assert main(["inspect", "confit/cifar100", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_tasks"] == 20 and info["classes_per_task"] == [5] * 20 and info["protocol"] == "task_il"
    assert info["bytes_per_task"] == 4 * (4 * 4800 + 6540 + 512 * 5 + 5)


@pytest.mark.parametrize("preset,n_tasks,size", [("cub200", 10, 20), ("caltech101", 10, 10), ("flowers102", 10, 10)])
def test_other_presets_load(preset, n_tasks, size):
    from retain.inspect import dry_scenario

    cfg = load_config(f"confit/{preset}")
    scenario = dry_scenario(cfg)
    assert scenario.classes_per_task == [size] * n_tasks and cfg.train.momentum == 0.0
    assert cfg.scenario.order_rng == "torch" and cfg.method.name == "confit"


def test_amp_does_not_touch_recovery():
    conv = nn.Conv2d(3, 4, 3, 2, 1, bias=False)
    mu = torch.randn(4, 3)
    ref = recover_mean(conv, mu, (6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = recover_mean(conv, mu, (6, 6))
    assert got.dtype == torch.float32 and torch.equal(got, ref)
