"""ConFiT (Jie et al. 2022) on several processes: BatchNorm -> SyncBatchNorm where torch supports it (CUDA, NCCL),
one warning where it does not (gloo), and the Xconv input trackers all-reduced so every process holds the global
batches' EMA. The conversion is tested on the CPU with the distributed state mocked (without a process group a
SyncBatchNorm computes what a BatchNorm2d does); the trackers and the warning on 2 real gloo processes."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from retain import distributed
from retain.config import load_config
from retain.engine import RunContext, build_run, evaluate, fit_task, run
from retain.methods.base import trainable_names
from retain.methods.confit import sync_batchnorm
from retain.models import create_backbone
from retain.models.xconv_bn import XconvBN, conv_bn_pairs

from conftest import CONFIT_CNN, torchrun_worker

CNN = CONFIT_CNN | {"method.name": "confit", "train.epochs": "2", "train.lr": "0.05"}
NOTICE = "torch's SyncBatchNorm needs CUDA"
BATCHES = [8, 3, 1, 6]  # global batches of the tracker check: split 4/4, 1/2, 0/1 (an empty slice), 3/3
# 3 classes per task of 9 images: global batches 8, 8, 8, 3, so the last one splits 1 / 2
UNEVEN = {"data.options": "{n_classes: 6, n_per_class: 9, n_test_per_class: 2, image_size: 8}"}

WORKER = """
import json, sys
import torch
from torch import nn
from retain import distributed
from retain.config import load_config
from retain.engine import run
from test_confit_sync import feed_trackers

spec = json.loads(sys.argv[1])
with distributed.session("cpu"):
    means = feed_trackers(spec["batches"])
    if distributed.rank() == 0:
        torch.save(means, spec["trackers"])
    run(load_config(None, spec["run"]), log=lambda *_: None)
"""


def feed_trackers(batches: list[int]) -> dict[str, torch.Tensor]:
    """Tracker means of a seeded CIFAR ResNet-20 with Xconv BN after seeded 9x9 batches (odd: phases of unequal
    size), each process fed its slice (``shard_bounds``); BN in eval mode, so a sample's activations do not depend
    on the other samples of its slice and the only difference 1 vs 2 processes can make is the trackers' reduction."""
    torch.manual_seed(0)
    backbone = create_backbone("cifar_resnet20", pretrained=False)
    xbn = XconvBN(backbone, n_tasks=1)
    backbone.train()
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    g = torch.Generator().manual_seed(1)
    for n in batches:
        x = torch.randn(n, 3, 9, 9, generator=g) + 0.5  # (n, 3, 9, 9)
        lo, hi = distributed.shard_bounds(n)
        with torch.no_grad():
            backbone(x[lo:hi])
    return {k: t.mean.clone() for k, t in xbn.trackers.items()}


def _names(method, task) -> dict[str, list[str]]:
    """What ConFiT trains and stores, by name: the contract the conversion must keep."""
    model = method.model
    stages = {s.name: sorted(trainable_names(model, s.params)) for s in method.stages(task)}
    return {"keys": list(model.state_dict()), "bn": method.bn_prefixes(), "pairs": conv_bn_pairs(model.backbone),
            "bn_names": method.xbn.bn_names, **stages}  # fmt: skip


def _confit(tiny, monkeypatch, supported: bool | None):
    """A tiny ConFiT (5 epochs: all 3 stages) set up as rank 0 of 2 processes would be where SyncBatchNorm is
    ``supported`` (None: 1 process)."""
    cfg = load_config(None, tiny(**(CNN | {"train.epochs": "5"})))
    torch.manual_seed(0)
    scenario, method = build_run(cfg, torch.device("cpu"))
    before = _names(method, scenario.tasks[0])
    with monkeypatch.context() as m:
        if supported is not None:
            for name, value in {"active": True, "is_main": True, "world_size": 2}.items():
                m.setattr(distributed, name, lambda v=value: v)
            m.setattr(distributed, "sync_batchnorm_supported", lambda device: supported)
        method.setup()
    return scenario, method, before, cfg


def test_sync_batchnorm_replaces_every_bn_and_keeps_names_keys_and_training(tiny, monkeypatch):
    scenario, method, before, cfg = _confit(tiny, monkeypatch, supported=True)
    bb = method.model.backbone
    syncs = [n for n, m in bb.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == 19 and not any(type(m) is nn.BatchNorm2d for m in bb.modules())
    assert _names(method, scenario.tasks[0]) == before  # state_dict keys, BN prefixes, pairs, every stage's set
    assert sync_batchnorm(bb) == 0  # once: a second setup changes nothing

    _, plain, _, _ = _confit(tiny, monkeypatch, supported=None)
    assert plain.model.state_dict().keys() == method.model.state_dict().keys()
    for m in (method, plain):  # without a process group SyncBatchNorm is BatchNorm2d's maths: same run, bit for bit
        ctx = RunContext(cfg.train, torch.device("cpu"))
        torch.manual_seed(1)
        for task in scenario.tasks:
            fit_task(m, task, ctx)
            evaluate(m, scenario, task.index, ctx)  # old task: snapshot restored, means recovered
    a, b = method.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(4)])
    assert torch.equal(method.predict(x, 0).logits, plain.predict(x, 0).logits)


def test_without_sync_batchnorm_rank0_warns_in_one_line(tiny, monkeypatch):
    with pytest.warns(UserWarning, match=NOTICE) as seen:
        _, method, _, _ = _confit(tiny, monkeypatch, supported=False)
    lines = [str(w.message) for w in seen if NOTICE in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0] and NOTICE in lines[0]
    assert "own 4 of the 8 images" in lines[0] and "run one process, or CUDA GPUs" in lines[0]
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in method.model.modules())


def test_one_process_neither_converts_nor_warns(tiny, monkeypatch, recwarn):
    _, method, _, _ = _confit(tiny, monkeypatch, supported=None)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in method.model.modules())
    assert not [w for w in recwarn if NOTICE in str(w.message)]


def test_two_gloo_processes_hold_the_one_process_tracker_means(tiny, tmp_path):
    """Trackers fed slices of different sizes (one empty) on 2 gloo processes equal the one-process trackers; a
    ConFiT run on 2 processes ends with the one-process stem tracker (its input is the images, whatever BN does),
    and rank 0 alone prints the notice, once."""
    one = feed_trackers(BATCHES)
    overrides = {"run": tiny(**(CNN | UNEVEN), name="two"), "batches": BATCHES, "trackers": str(tmp_path / "t.pt")}
    proc = torchrun_worker(tmp_path, WORKER, overrides)
    two = torch.load(tmp_path / "t.pt")
    assert one.keys() == two.keys() and len(one) == 19
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-6, atol=1e-7, msg=k)
    assert proc.stderr.count(NOTICE) == 1, proc.stderr[-3000:]

    run(load_config(None, tiny(**(CNN | UNEVEN), name="one")), log=lambda *_: None)
    wa, wb = (load_file(str(tmp_path / "runs" / n / "checkpoints" / "task_001.safetensors")) for n in ("one", "two"))
    for key in ("xbn.trackers.conv1.mean", "xbn.trackers.conv1.saved"):  # (1, 3); (2, 1, 3): both tasks' snapshots
        assert wa[key].abs().sum() > 0
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-7, msg=key)
