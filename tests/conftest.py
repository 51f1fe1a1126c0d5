import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is as fast and never oversubscribes a busy machine
os.environ.setdefault("RETAIN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test"))

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
SHARED_DATA = SHARED / "data"


# ConFiT's tiny setting: a CNN method, so a CIFAR ResNet-20 on 8x8 images, task-IL, plain SGD (``tiny(**CONFIT_CNN)``)
CONFIT_CNN = {
    "model.backbone": "cifar_resnet20",
    "model.kwargs": "{}",
    "data.image_size": "8",
    "data.options": "{n_classes: 4, n_per_class: 8, n_test_per_class: 4, image_size: 8}",
    "scenario.protocol": "task_il",
    "train.momentum": "0.0",
}


def tiny_overrides(tmp_path: Path, **extra: str) -> list[str]:
    """A 2-task synthetic stream and a 1-block ViT: a whole run takes about a second."""
    base = {
        "out_dir": str(tmp_path / "runs"),
        "data.name": "synthetic",
        "data.options": "{n_classes: 4, n_per_class: 12, n_test_per_class: 6, image_size: 16}",
        "data.image_size": "16",
        "scenario.n_tasks": "2",
        "model.backbone": "vit_nano_patch4_32",
        "model.pretrained": "false",
        "model.kwargs": "{depth: 1, embed_dim: 32, num_heads: 2, img_size: 16}",
        "train.epochs": "1",
        "train.batch_size": "8",
        "train.progress": "false",
        "train.tensorboard": "false",
        "train.device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(autouse=True)
def _one_thread():
    """Runs may set train.threads (the demo preset: 2); give every test back one thread (forked children too)."""
    yield
    torch.set_num_threads(1)


@pytest.fixture
def tiny(tmp_path):
    return lambda **extra: tiny_overrides(tmp_path, **extra)


def build_with_random_weights(overrides: list[str]):
    """(method, the model before surgery) on a dry scenario of ``overrides``, the backbone's weights random and
    non-zero (seeded), so that an identity at init is a real test."""
    import copy

    from retain.config import load_config
    from retain.engine.build import build_method, build_model
    from retain.inspect import dry_scenario

    cfg = load_config(None, overrides)
    scenario = dry_scenario(cfg)
    model = build_model(cfg, scenario)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    reference = copy.deepcopy(model).eval()
    return build_method(cfg, model, scenario), reference


def torchrun_worker(tmp_path: Path, source: str, spec: object, timeout: float = 300):
    """Run ``source`` as a script on 2 gloo processes (torchrun, standalone) with ``json.dumps(spec)`` as its one
    argument, ``tests`` importable; the finished process (its exit code asserted 0, stderr's tail as the message)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    worker = tmp_path / "worker.py"
    worker.write_text(source)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           json.dumps(spec)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def needs_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data next to the project)")
    return path


def interrupted_then_resumed(overrides: list[str], monkeypatch) -> tuple[dict, dict]:
    """Run ``overrides`` uninterrupted, then again interrupted before task 1 and resumed; both metric records."""
    from retain import engine
    from retain.config import load_config
    from retain.engine import loop

    full = engine.run(load_config(None, overrides + ["name=full"]), log=lambda *_: None)
    real_fit = loop.fit_task

    def crash_on_second(method, task, ctx, *args, **kwargs):
        if task.index == 1:
            raise KeyboardInterrupt
        return real_fit(method, task, ctx, *args, **kwargs)

    monkeypatch.setattr(loop, "fit_task", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        engine.run(load_config(None, overrides + ["name=cut"]), log=lambda *_: None)
    monkeypatch.setattr(loop, "fit_task", real_fit)
    resumed = engine.run(load_config(None, overrides + ["name=cut"]), resume=True, log=lambda *_: None)
    return full, resumed
