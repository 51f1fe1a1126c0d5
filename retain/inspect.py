"""``retain inspect``: build a preset's model without downloading anything and report what it trains and stores."""

from __future__ import annotations

from retain.config import ConfigError, RunConfig
from retain.data.scenarios import Scenario, Task, make_class_order, task_sizes
from retain.metrics import storage_rule

__all__ = ["inspect_config", "KNOWN_NUM_CLASSES"]

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


def inspect_config(cfg: RunConfig) -> dict:
    """Parameters trained and bytes stored per task (task 0 and the last task) of ``cfg``'s method, and the rule
    the bytes follow (``retain.metrics.storage_rule``).

    The count is the run's own (``Method.trained_names``: parameters some stage with a budget trains), so
    ``retain inspect`` and ``metrics.json``'s ``trainable_params`` agree.
    """
    from retain.engine.build import build_method, build_model

    scenario = dry_scenario(cfg)
    cfg.model.pretrained = False  # never download for an inspection
    model = build_model(cfg, scenario)
    method = build_method(cfg, model, scenario)
    method.setup()
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
    }  # fmt: skip
