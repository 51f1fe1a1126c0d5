"""retain: continual fine-tuning of pre-trained vision models without catastrophic forgetting."""

from retain.config import RunConfig, load_config
from retain.data import create_dataset
from retain.data.scenarios import create_scenario
from retain.engine import build_run, run
from retain.methods import METHODS, method_names
from retain.models import create_backbone

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "create_dataset", "create_scenario", "build_run", "run", "METHODS",
           "method_names", "create_backbone", "create_method"]  # fmt: skip


def create_method(name: str, *args, **kwargs):
    """The method class registered as ``name`` instantiated with ``(cfg, model, scenario, train_cfg)``."""
    return METHODS.get(name)(*args, **kwargs)
