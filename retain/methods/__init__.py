"""Continual-learning methods: one file each, registered by name (``create_method("finetune", ...)``).

A method's name is written once, as the default of its config's ``name`` field (equal to its file stem);
``@register_method`` registers the method in ``METHODS`` and its config in ``retain.config.METHOD_CONFIGS``.
"""

from retain.methods import (  # noqa: F401  (fill the registry)
    block_expansion,
    confit,
    ewc,
    finetune,
    joint,
    linear_probe,
    ln_tuning,
    lora,
    lwf,
    pad,
    simplecil,
)
from retain.methods.base import METHODS, ContinualModel, Method, MethodConfig, Stage, mark_trainable, register_method

__all__ = ["METHODS", "Method", "MethodConfig", "Stage", "ContinualModel", "register_method", "mark_trainable",
           "method_config_class", "method_names"]  # fmt: skip


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the method registered as ``name``."""
    return METHODS.get(name).config_class


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return METHODS.names()
