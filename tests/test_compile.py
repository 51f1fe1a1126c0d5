"""``train.compile`` (retain.engine.compiling): the backbone's forward_features compiled once per run, a bounded
number of graphs over many tasks, the same results as uncompiled, and a log line where it does not apply or torch
gives up. Graphs are made with the ``aot_eager`` backend (traced through AOT autograd, run without code generation),
so the tests take seconds; the inductor backend on a GPU is ``benchmarks/gpu_check.py``'s."""

import copy

import pytest
import torch

from retain.config import load_config
from retain.engine import compiling
from retain.engine.build import build_run
from retain.engine.loop import train

from conftest import CONFIT_CNN

TEN_TASKS = {
    "scenario.n_tasks": "10",
    "data.options": "{n_classes: 20, n_per_class: 6, n_test_per_class: 3, image_size: 16}",
}


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setitem(compiling.OPTIONS, "backend", "aot_eager")
    yield
    torch.compiler.reset()


def _run(overrides: list[str], name: str):
    logs: list[str] = []
    record, method = train(load_config(None, [*overrides, f"name={name}"]), log=logs.append)
    return record, method, logs


@pytest.mark.parametrize("method, extra", [("finetune", {}), ("lwf", {}), ("confit", CONFIT_CNN)])
def test_compiled_run_equals_uncompiled(tiny, method, extra):
    """Same accuracy matrix and bit-identical weights with and without train.compile (aot_eager graphs), and the
    compiled run really went through compiled graphs."""
    size = 8 if method == "confit" else 16
    options = f"{{n_classes: 6, n_per_class: 8, n_test_per_class: 4, image_size: {size}}}"
    base = tiny(
        **{"method.name": method, "scenario.n_tasks": "3", "train.epochs": "2", **extra, "data.options": options}
    )
    plain, m_plain, _ = _run([*base, "train.compile=false"], "plain")
    compiled, m_compiled, logs = _run([*base, "train.compile=true"], "compiled")
    assert compiling.compilations() >= 1
    assert m_compiled.model.compiled_features is not None and m_plain.model.compiled_features is None
    assert compiled["accuracy_matrix"] == plain["accuracy_matrix"]
    a, b = m_plain.model.state_dict(), m_compiled.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [line for line in logs if line.startswith("[compile]")]


def test_compilations_bounded_over_ten_tasks(tiny):
    """Ten tasks of fine-tuning compile the backbone for training and for evaluation, not per task (the loss module
    compiled per stage used to recompile each task and hit torch's limit of 8 on the ninth)."""
    _run(tiny(**{"method.name": "finetune", "train.compile": "true", **TEN_TASKS}), "ten")
    assert 1 <= compiling.compilations() <= 3


def test_teacher_copy_uses_its_own_weights(tiny):
    """A deep copy of a compiled model (LwF's teacher) shares the compiled function but computes with its own
    weights."""
    cfg = load_config(None, tiny(**{"method.name": "lwf", "train.compile": "true"}))
    _, method = build_run(cfg, torch.device("cpu"))
    assert compiling.enable_compile(method, print)
    model = method.model.eval()
    x = torch.randn(4, 3, 16, 16)
    teacher = copy.deepcopy(model)
    before = teacher.features(x)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.5)
    assert teacher.compiled_features is model.compiled_features
    assert torch.equal(teacher.features(x), before)
    assert not torch.allclose(model.features(x), before)


@pytest.mark.parametrize("method, extra", [("pad", {}), ("ln_tuning", {}), ("lora", {"scenario.protocol": "task_il"})])
def test_methods_that_change_the_backbone_run_uncompiled_and_say_so(tiny, method, extra):
    record, m, logs = _run(tiny(**{"method.name": method, "train.compile": "true", **extra}), "uncompiled")
    notes = [line for line in logs if line.startswith("[compile]")]
    assert len(notes) == 1 and f"{method} runs uncompiled" in notes[0], logs
    assert m.model.compiled_features is None
    assert record["accuracy_matrix"]


def test_abandoned_compilation_is_logged_once(tiny, monkeypatch):
    """When torch reaches its recompile limit (here 1: training and evaluation need two graphs) the run goes on
    uncompiled and the log says so, once."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    record, _, logs = _run(tiny(**{"method.name": "finetune", "train.compile": "true"}), "limit")
    notes = [line for line in logs if line.startswith("[compile]")]
    assert len(notes) == 1 and "stopped compiling" in notes[0] and "_forward_features" in notes[0], logs
    assert len(record["accuracy_matrix"]) == 2
