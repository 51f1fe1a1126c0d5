"""The retention probe's score before training, kept in a cache keyed by everything that decides it.

Runs that start from the same deployed model and probe the same retention set the same way (a sweep over learning
rates, methods that start as the bare backbone, the variants of ``peft_vit/*``) score the same number before their
first task: an ImageNet-1k pass each. The first computes it and writes ``<out_dir>/retention_cache/<key>.json``; the
others read it. The key is the sha256 of :func:`cache_material`: the digests of the model's tensors as deployed
(less the task heads, which features never read), the method and its config, the retention config, the transform,
the precision and batch size of the pass, and the versions of retain and torch. Only JSON is read, never a pickle.

The folder is under ``out_dir``, the runs' own results folder (a sweep's runs share it: ``<out_dir>/<sweep>/``):
it is written by the same process that writes the runs, and it goes with them. ``data.cache_dir`` holds data
(downloads, decoded arrays) that machines or users may share and that is kept when results are deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import retain
from retain import distributed
from retain.config import RunConfig
from retain.data.cache import atomic_write
from retain.engine.build import precision_used
from retain.engine.evaluation import retention_accuracy
from retain.engine.rundir import combined_sha256, state_sha256
from retain.methods.base import Method

__all__ = ["CACHE_FOLDER", "initial_retention", "cache_material", "cache_path"]

CACHE_FOLDER = "retention_cache"
_HEADS = "head.heads."  # the task heads (``head_prefix``): ``features`` never reads them


def initial_retention(cfg: RunConfig, method: Method, sets: tuple[Dataset, Dataset], log: Callable = print) -> float:
    """The retention k-NN accuracy of the method as deployed before its first task, from the cache when a run with
    the same key computed it (rank 0 decides, every process follows), else computed and cached."""
    r, main = cfg.data.retention, distributed.is_main()
    with method.deployed():
        material = cache_material(cfg, method, sets[0]) if main else {}
        path = cache_path(cfg, material)
        found = torch.tensor([_read(path) if main else float("nan")], dtype=torch.float64)
        score = float(distributed.broadcast_from_main(found)[0])
        if score == score:  # not NaN: a hit
            log(f"[retention] the score before training ({score:.2f}) is reused from {path}")
            return score
        score = retention_accuracy(method, sets, r.k, r.temperature)
    if main:
        _write(path, {"retention_knn": score, "key": material})
    return score


def cache_material(cfg: RunConfig, method: Method, data: Dataset) -> dict[str, Any]:
    """What decides the score before training (call inside ``method.deployed()``), as JSON-ready values (object
    addresses left out of the transform's repr)."""
    modules = {"model": method.model} | {n: v for n, v in vars(method).items() if isinstance(v, nn.Module)}
    digests = {f"{n}.{k}": d for n, m in modules.items() for k, d in state_sha256(m.state_dict()).items()
               if not (n == "model" and k.startswith(_HEADS))}  # fmt: skip
    d, transform = cfg.data, re.sub(r" at 0x[0-9a-f]+", "", repr(data.transform))
    return {"model": {"backbone": cfg.model.backbone, "sha256": combined_sha256(digests)},
            "method": _plain(cfg.method), "retention": _plain(d.retention), "transform": transform,
            "data": {"image_size": d.image_size, "normalize": d.normalize, "resize": d.resize,
                     "interpolation": d.interpolation, "device_resize": d.device_resize},
            "precision": precision_used(cfg.train, method.device), "eval_batch_size": cfg.train.eval_batch_size,
            "versions": {"retain": retain.__version__, "torch": torch.__version__}}  # fmt: skip


def cache_path(cfg: RunConfig, material: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cfg.out_dir) / CACHE_FOLDER / f"{key}.json"


def _plain(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _read(path: Path) -> float:
    """The cached score, or NaN when there is none (or it cannot be read: it is then computed again)."""
    try:
        return float(json.loads(path.read_text())["retention_knn"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("nan")


def _write(path: Path, record: dict[str, Any]) -> None:
    """Atomically: a run that reads it meanwhile sees the whole file or none. The temporary file's name is unique
    (``mkstemp``; a pid is not: two hosts or containers sharing ``out_dir`` can have the same), so runs that compute
    the same key at once each write their own and the last rename wins: both hold the same score."""
    text = json.dumps(record, indent=1, sort_keys=True, default=str)
    atomic_write(path, lambda f: f.write(text), mode="w", fsync=True)
