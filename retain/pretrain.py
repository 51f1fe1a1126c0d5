"""Pre-train a backbone from scratch (``retain pretrain PRESET``) and export it as a shippable tag.

A pre-training run is an ordinary single-task run (``scenario.protocol: finetune``, natural class order) of the
``finetune`` method; afterwards the backbone and its classifier are written under timm's parameter names as
``<arch>.retain_<dataset>.safetensors`` (fp16 by default) with a JSON card: dataset, recipe, epochs, test accuracy,
sha256.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from retain.config import ConfigError, RunConfig, config_to_dict
from retain.engine import train
from retain.models.backbones import file_sha256 as sha256_of

__all__ = ["pretrain", "export_backbone", "sha256_of"]


def export_backbone(model, classifier: str, path: Path, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Backbone + single-task head under timm's names (``<classifier>.weight``) as safetensors; returns sizes."""
    state = {k: v for k, v in model.backbone.state_dict().items()}
    head = model.head.heads[0]  # the single task's
    state[f"{classifier}.weight"], state[f"{classifier}.bias"] = head.weight, head.bias
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return {"tensors": len(state), "params": sum(v.numel() for v in state.values())}


def pretrain(cfg: RunConfig, export_dir: str | Path | None = None, fp16: bool = True, command: str = "") -> Path:
    """Run the pre-training preset, export weights and card; returns the card path."""
    if cfg.scenario.protocol != "finetune" or cfg.method.name != "finetune":
        raise ConfigError("a pretrain preset needs scenario.protocol=finetune and method.name=finetune")
    if cfg.scenario.order_seed is not None or cfg.scenario.class_order is not None:
        raise ConfigError("a pretrain preset needs scenario.order_seed=null (labels in the dataset's own order)")
    record, method = train(cfg)
    out_run = Path(cfg.out_dir) / cfg.name
    arch = cfg.model.backbone.split(".")[0]
    tag = f"{arch}.retain_{cfg.data.name}"
    out = Path(export_dir) if export_dir is not None else out_run
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{tag}.safetensors"
    classifier = method.model.backbone.pretrained_cfg.get("classifier", "head")
    sizes = export_backbone(method.model, classifier, weights, torch.float16 if fp16 else torch.float32)
    card = {
        "tag": tag, "architecture": arch, "dataset": cfg.data.name, "data_root": cfg.data.root,
        "test_accuracy": record["accuracy_matrix"][0][0], "epochs": cfg.train.epochs,
        "train_time_s": round(record["total_time_s"], 1), "dtype": "float16" if fp16 else "float32",
        "params": sizes["params"], "file": weights.name, "sha256": sha256_of(weights),
        "command": command, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "recipe": config_to_dict(cfg),
    }  # fmt: skip
    card_path = out / f"{tag}.json"
    card_path.write_text(json.dumps(card, indent=1))
    return card_path
