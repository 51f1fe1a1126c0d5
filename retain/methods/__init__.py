"""Continual-learning methods: one file each, registered by name (``create_method("finetune", ...)``).

A method's name is written once, as the default of its config's ``name`` field (equal to its file stem);
``@register_method`` registers the method in ``METHODS`` and its config in ``retain.config.METHOD_CONFIGS``.
"""

from retain.methods import (  # noqa: F401  (fill the registry)
    block_expansion,
    coda_prompt,
    confit,
    dualprompt,
    ewc,
    finetune,
    joint,
    l2p,
    linear_probe,
    ln_tuning,
    lora,
    lwf,
    pad,
    simplecil,
)
from retain.methods.base import (
    METHODS,
    ContinualModel,
    Method,
    MethodConfig,
    Prediction,
    Stage,
    mark_trainable,
    register_method,
)
from retain.methods.per_task import PerTaskMethod

__all__ = ["METHODS", "Method", "MethodConfig", "Stage", "Prediction", "ContinualModel", "PerTaskMethod",
           "register_method", "mark_trainable", "method_names"]  # fmt: skip


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return METHODS.names()
