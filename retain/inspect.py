"""``retain inspect``: build a preset's model without downloading anything and report what it trains and stores,
and an estimate of the disk its run will use."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import torch

from retain.config import ConfigError, RunConfig, checkpoint_interval, checkpoints_kept
from retain.data.scenarios import Scenario, Task, make_class_order, task_sizes
from retain.metrics import storage_rule

if TYPE_CHECKING:
    from retain.methods.base import Method

__all__ = ["inspect_config", "disk_estimate", "dry_scenario", "dry_method", "dry_build", "KNOWN_NUM_CLASSES"]

KNOWN_NUM_CLASSES = {
    "cifar10": 10,
    "cifar100": 100,
    "caltech101": 101,
    "fashion_mnist": 10,
    "digits": 10,
    "imagenet32": 1000,
}


def _num_classes(cfg: RunConfig) -> int:
    d = cfg.data
    if d.num_classes is not None:
        return d.num_classes
    if d.name == "synthetic":
        return int(d.options.get("n_classes", 10))
    if d.name in KNOWN_NUM_CLASSES:
        return KNOWN_NUM_CLASSES[d.name]
    raise ConfigError(f"cannot tell how many classes {d.name!r} has without reading it; set data.num_classes=N")


def dry_scenario(cfg: RunConfig) -> Scenario:
    """The scenario's task structure without any data (datasets left as None)."""
    n = _num_classes(cfg)
    order = make_class_order(n, cfg.scenario)
    sizes = task_sizes(len(order), cfg.scenario)[: cfg.scenario.use_tasks]
    tasks, offset = [], 0
    for t, size in enumerate(sizes):
        tasks.append(Task(t, order[offset : offset + size], offset, None, None, None))
        offset += size
    return Scenario(cfg.scenario.protocol, tasks, order[:offset])


def dry_method(cfg: RunConfig) -> tuple[Scenario, Method]:
    """``cfg``'s scenario without data and its method, set up, on a backbone built without its weights (nothing is
    downloaded; ``cfg.model.pretrained`` is set to False)."""
    scenario, method, _ = dry_build(cfg)
    return scenario, method


def dry_build(cfg: RunConfig) -> tuple[Scenario, Method, set[str]]:
    """``dry_method``, and the names of the model's tensors ``setup`` left as built (the same tensor with the same
    values): those a per-task checkpoint leaves out until a stage trains them (``Method.checkpoint_bytes``)."""
    from retain.engine.build import build_method, build_model
    from retain.engine.rundir import tensor_sha256

    scenario = dry_scenario(cfg)
    cfg.model.pretrained = False  # never download for an inspection
    method = build_method(cfg, build_model(cfg, scenario), scenario)

    def mark(v: torch.Tensor) -> tuple:  # a meta tensor (a model built without memory) has no values to hash
        return (v.data_ptr(), tensor_sha256(v)) if not v.is_meta else ("meta", tuple(v.shape), v.dtype)

    built = {k: mark(v) for k, v in method.model.state_dict().items()}
    method.setup()
    now = method.model.state_dict().items()
    return scenario, method, {k for k, v in now if built.get(k) == mark(v)}


def inspect_config(cfg: RunConfig) -> dict:
    """Parameters trained and bytes stored per task (task 0 and the last task) of ``cfg``'s method, and the rule
    the bytes follow (``retain.metrics.storage_rule``).

    The count is the run's own (``Method.trained_names``: parameters some stage with a budget trains), so
    ``retain inspect`` and ``metrics.json``'s ``trainable_params`` agree.
    """
    scenario, method, unchanged = dry_build(cfg)
    model = method.model
    params = dict(model.named_parameters())
    per_task = []
    for task in (scenario.tasks[0], scenario.tasks[-1]):
        model.set_seen(task.index + 1)
        names = method.trained_names(task)
        per_task.append((sum(params[n].numel() for n in names), method.bytes_per_task(task)))
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    return {
        "method": cfg.method.name, "backbone": cfg.model.backbone, "dataset": cfg.data.name,
        "protocol": scenario.protocol, "n_tasks": scenario.n_tasks, "classes_per_task": scenario.classes_per_task,
        "class_order_head": scenario.class_order[:10], "backbone_params": backbone_params,
        "trainable_params": per_task[0][0], "bytes_per_task": per_task[0][1],
        "trainable_params_last_task": per_task[1][0], "bytes_last_task": per_task[1][1],
        "storage_rule": storage_rule(scenario.protocol),
    } | disk_estimate(cfg, scenario, method, unchanged)  # fmt: skip


def _nbytes(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> int:
    from retain.methods.base import tensor_bytes

    return tensor_bytes(tensors.values() if isinstance(tensors, dict) else tensors)


def _stage_state_bytes(cfg: RunConfig, method: Method, task: Task) -> int | None:
    """The most any stage of ``task`` adds to a mid-task checkpoint beyond ``checkpoint_state()``: its optimiser's
    state (SGD momentum: one copy of the trained parameters; Adam/AdamW: two, and a step count each) and, under
    ``train.schedule=plateau``, the best-weights snapshot (the model's state less the parameters it freezes); None
    when no stage trains (nothing is saved inside the task)."""
    from retain.models.adapters import trainable_names

    params, state = dict(method.model.named_parameters(remove_duplicate=False)), method.model.state_dict()
    most = None
    for stage in (s for s in method.stages(task) if s.has_budget):
        names = set(trainable_names(method.model, stage.params))
        trained = _nbytes([params[n] for n in names])
        optimizer = stage.optimizer or cfg.train.optimizer
        extra = {"sgd": trained if cfg.train.momentum else 0}.get(optimizer, 2 * trained + 4 * len(names))
        if cfg.train.schedule == "plateau":
            extra += _nbytes({k: v for k, v in state.items() if k not in params or k in names})
        most = max(most or 0, extra)
    return most


def _artefact_bytes(method: Method, scenario: Scenario) -> int:
    """An artefact's tensors: ``deployed_state()`` after the last task less the backbone parameters no stage of any
    task trains (buffers such as BatchNorm statistics are taken as changed)."""
    trained: set[str] = set()
    for task in scenario.tasks:
        method.model.set_seen(task.index + 1)
        trained |= set(method.trained_names(task))
    frozen = {n for n, _ in method.model.named_parameters() if n.startswith("backbone.") and n not in trained}
    current, method.task = method.task, scenario.tasks[-1]
    try:
        deployed = method.deployed_state()
    finally:
        method.task = current
    return _nbytes({k: v for k, v in deployed.items() if k not in frozen})


def _checkpoint_bytes(method: Method, task: Task, unchanged: Collection[str]) -> tuple[int, int]:
    """(bytes of the per-task checkpoint after ``task``, bytes of ``checkpoint_state()`` then): ``checkpoint_bytes``
    less the tensors it leaves out (``Method.checkpoint_bytes`` with and without ``unchanged``), so that a method
    counting tensors its ``after_task`` adds (EWC) keeps them."""
    from retain.methods.base import Method

    full = method.checkpoint_bytes(task)
    return full - Method.checkpoint_bytes(method, task) + Method.checkpoint_bytes(method, task, unchanged), full


def disk_estimate(cfg: RunConfig, scenario: Scenario, method: Method, unchanged: Collection[str] = ()) -> dict:
    """Bytes the run of ``cfg`` will hold on disk, from the tensor sizes of the built method (an estimate: file
    headers, JSON files and TensorBoard events are not counted; nothing is trained).

    ``disk_checkpoint_bytes``: each per-task checkpoint (``Method.checkpoint_bytes``: without the parameters among
    ``unchanged``, from ``dry_build``, that no stage has trained yet; every tensor when it is empty);
    ``disk_midtask_bytes``: the largest mid-task checkpoint (the method's whole state, the stage's optimiser state and
    plateau snapshot, RNG states); ``disk_artefact_bytes``: ``retain export``'s file; ``disk_at_end``: the per-task
    checkpoints ``run.keep_checkpoints`` keeps, plus the artefact with ``run.export_each_task``; ``disk_peak``: the
    most during the run (a save writes the new file before the previous one goes: inside a task two mid-task
    checkpoints next to the kept per-task ones, at its end the new per-task checkpoint next to them and the mid-task
    one). Buffers, and parameters a stage trains, are counted even where they end as they began: an upper bound.
    """
    n = scenario.n_tasks
    per_task, midtask = [0] * n, [0] * n
    if cfg.checkpoint:
        sizes = [_checkpoint_bytes(method, t, unchanged) for t in scenario.tasks]
        per_task, full = [b for b, _ in sizes], [f for _, f in sizes]
        rng = 2 * torch.get_rng_state().numel() + 624 * 4  # torch's global and the loader's generator; NumPy's
        if any(checkpoint_interval(cfg.run.checkpoint_every)):
            extra = [_stage_state_bytes(cfg, method, t) for t in scenario.tasks]
            midtask = [0 if e is None else b + e + rng for b, e in zip(full, extra, strict=True)]
    artefact = _artefact_bytes(method, scenario)
    keep = checkpoints_kept(cfg.run.keep_checkpoints) or n
    own = artefact if cfg.run.export_each_task else 0
    peak = 0
    for t in range(n):  # a save writes the new file before the previous one goes
        kept = sum(per_task[max(0, t - keep) : t]) + (own if t else 0)  # on disk while task t runs
        peak = max(peak, kept + 2 * midtask[t], kept + midtask[t] + per_task[t] + own)
    left_out = "leave out the frozen backbone and later tasks' untrained parameters" if unchanged else "count all"
    return {
        "disk_estimate": f"from tensor sizes, an upper bound (per-task checkpoints {left_out}; file headers, JSON and "
                         "TensorBoard files not counted)",
        "disk_keep_checkpoints": cfg.run.keep_checkpoints, "disk_checkpoint_bytes": per_task,
        "disk_midtask_bytes": max(midtask), "disk_artefact_bytes": artefact,
        "disk_at_end": sum(per_task[-keep:]) + own, "disk_peak": peak,
        "disk_all_checkpoints": sum(per_task),
    }  # fmt: skip
