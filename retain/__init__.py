"""retain: continual fine-tuning of pre-trained vision models without catastrophic forgetting.

The names below are imported on first use (PEP 562), so ``import retain.config`` loads neither torch nor timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retain.artefact import export_run, load
    from retain.config import RunConfig, load_config
    from retain.data import create_dataset
    from retain.data.scenarios import create_scenario
    from retain.engine import build_run, run
    from retain.methods import METHODS, method_names
    from retain.models import create_backbone

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "create_dataset", "create_scenario", "build_run", "run", "METHODS",
           "method_names", "create_backbone", "create_method", "load", "export_run"]  # fmt: skip

_LAZY = {  # public name -> the module it comes from
    "RunConfig": "retain.config",
    "load_config": "retain.config",
    "create_dataset": "retain.data",
    "create_scenario": "retain.data.scenarios",
    "build_run": "retain.engine",
    "run": "retain.engine",
    "METHODS": "retain.methods",
    "method_names": "retain.methods",
    "create_backbone": "retain.models",
    "load": "retain.artefact",
    "export_run": "retain.artefact",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def create_method(name: str, *args: Any, **kwargs: Any) -> Any:
    """The method class registered as ``name`` instantiated with ``(cfg, model, scenario, train_cfg)``."""
    from retain.methods import METHODS

    return METHODS.get(name)(*args, **kwargs)
