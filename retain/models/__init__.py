"""Backbones (timm and our 32-px models), heads and adapters."""

from retain.models.backbones import PRETRAINED_TAGS, backbone_names, create_backbone, data_config, load_weights
from retain.models.heads import TaskHeads

__all__ = ["PRETRAINED_TAGS", "TaskHeads", "backbone_names", "create_backbone", "data_config", "load_weights"]
