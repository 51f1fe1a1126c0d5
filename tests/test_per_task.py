"""The per-task contract (``retain.methods.per_task``): a new method that says what each task owns gets routing by
task id, old tasks left untouched, ``task_state`` / ``bytes_per_task``, the artefact and resume from the base class.

``TaskOffset`` is the smallest per-task method, written here as a user would (docs/architecture.md counts its
lines): each task owns one row of a (T, D) table added after the ViT's final norm. LN tuning, LoRA and Block
Expansion are the same shape with more model surgery.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import retain
from retain.artefact import ARTEFACT_FILE
from retain.config import METHOD_CONFIGS, load_config
from retain.engine import RunContext, build_run, fit_task, train
from retain.methods import METHODS, MethodConfig, PerTaskMethod, register_method
from retain.models.adapters import replace_modules

from conftest import interrupted_then_resumed

CPU = torch.device("cpu")


# ---- the example method (begin) -------------------------------------------------------------------------------------
class OffsetNorm(nn.Module):
    """A LayerNorm followed by row ``task`` of a (rows, D) offset table (zero at init: the pre-trained function)."""

    def __init__(self, norm: nn.LayerNorm, rows: int) -> None:
        super().__init__()
        self.norm = norm
        self.offsets = nn.Parameter(torch.zeros(rows, norm.normalized_shape[0]))  # (T, D)
        self.task = 0

    def set_task(self, task: int) -> None:  # what the routing switch calls
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.offsets[self.task]  # (B, N, D)


@dataclass
class TaskOffsetConfig(MethodConfig):
    name: str = "task_offset"
    train_mask: str = "current"
    per_task: bool | None = None  # None: per task in task-IL and fine-tuning, one shared row in class-IL


class TaskOffset(PerTaskMethod):
    """Each task owns one row of an offset table after the ViT's final norm, chosen by task id."""

    config_class = TaskOffsetConfig

    def __init__(self, cfg, model, scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        rows = scenario.n_tasks if self.per_task else 1
        replace_modules(model.backbone, "norm", lambda _, norm: OffsetNorm(norm, rows))
        self.row_tables = frozenset({"backbone.norm.offsets"} if self.per_task else ())

    def owned(self, t: int) -> list[str]:
        return ["backbone.norm.offsets"]


# ---- the example method (end) ---------------------------------------------------------------------------------------


@pytest.fixture
def task_offset():
    """``TaskOffset`` registered for the test, then removed from both registries."""
    methods, configs = dict(METHODS._items), dict(METHOD_CONFIGS._items)
    register_method(TaskOffset)
    yield
    METHODS._items.clear()
    METHODS._items.update(methods)
    METHOD_CONFIGS._items.clear()
    METHOD_CONFIGS._items.update(configs)


def _overrides(tiny, protocol="task_il", **extra):
    return tiny(**{"method.name": "task_offset", "scenario.protocol": protocol, "train.lr": "0.1", **extra})


def test_each_task_owns_its_row_routed_by_task_id_and_old_tasks_stay_untouched(tiny, task_offset):
    cfg = load_config(None, _overrides(tiny))
    scenario, method = build_run(cfg, CPU)
    ctx = RunContext(cfg.train, CPU)
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(4)])
    fit_task(method, scenario.tasks[0], ctx)
    method.model.eval()
    after0 = method.predict(x, 0).logits
    table = method.model.backbone.norm.offsets
    row0 = table[0].detach().clone()
    assert row0.any() and not table[1].any()  # task 0 trained its own row only
    fit_task(method, scenario.tasks[1], ctx)
    method.model.eval()
    assert torch.equal(table[0], row0) and table[1].any()
    assert torch.equal(method.predict(x, 0).logits[:, :2], after0[:, :2])  # task 0's row and head, as they were
    assert not torch.equal(method.predict(x, 1).logits[:, :2], method.predict(x, 0).logits[:, :2])
    state = method.task_state(scenario.tasks[1])
    assert set(state) == {"head.heads.1.weight", "head.heads.1.bias", "backbone.norm.offsets"}
    assert torch.equal(state["backbone.norm.offsets"], table[1])  # a row slice: the row task 1 owns
    assert method.bytes_per_task(scenario.tasks[1]) == 4 * (32 + 2 * 32 + 2)
    assert set(method.trained_names(scenario.tasks[1])) == {"backbone.norm.offsets", "head.heads.1.weight",
                                                            "head.heads.1.bias"}  # fmt: skip


def test_class_il_trains_one_shared_row_that_belongs_to_the_model(tiny, task_offset):
    cfg = load_config(None, _overrides(tiny, "class_il"))
    scenario, method = build_run(cfg, CPU)
    assert not method.per_task and method.model.backbone.norm.offsets.shape == (1, 32)
    assert set(method.task_state(scenario.tasks[1])) == {"head.heads.1.weight", "head.heads.1.bias"}


def test_artefact_after_each_task_reloads_and_resume_is_exact(tiny, tmp_path, task_offset, monkeypatch):
    _, method = train(load_config(None, _overrides(tiny, **{"run.export_each_task": "true", "name": "a"})))
    predictor = retain.load(tmp_path / "runs" / "a" / ARTEFACT_FILE)
    x = torch.stack([method.scenario.tasks[1].test[i][0] for i in range(3)])
    method.model.eval()
    with method.deployed():
        for t in (0, 1):
            assert torch.equal(predictor.method.predict(x, t).logits, method.predict(x, t).logits)
    full, resumed = interrupted_then_resumed(_overrides(tiny), monkeypatch)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
