"""Set-up of a run: seeding, device, datasets with their transforms, the model, and the method around it."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from retain import distributed
from retain.config import ConfigError, RunConfig, TrainConfig
from retain.data import ImageDataset, UnreadableImageError, build_transform, check_images, create_dataset, drop_images
from retain.data.device_resize import build_native_transform
from retain.data.scenarios import Scenario, create_scenario
from retain.methods import METHODS, Method
from retain.models import TaskHeads, create_backbone, data_config
from retain.models.backbones import check_sha256
from retain.models.continual import ContinualModel

__all__ = ["seed_everything", "resolve_device", "tf32_mode", "precision_used", "build_transforms", "build_datasets",
           "check_images_once", "build_model", "build_method", "build_run", "probe_backbone", "rebuild_method",
           "retention_datasets"]  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device; under several processes on GPUs, this process's GPU (``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible; use train.device=auto or cpu")
    if name == "cuda" and distributed.active():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


@contextmanager
def tf32_mode(enabled: bool, device: torch.device | str) -> Iterator[None]:
    """``train.tf32`` while inside: on a CUDA ``device`` (a ``train.device`` name is resolved), TF32 for float32
    matmuls and cuDNN convolutions on or off (``torch.backends.cuda.matmul.allow_tf32``, ``cudnn.allow_tf32``), the
    previous flags restored on exit; on any other device nothing is touched."""
    device = resolve_device(device) if isinstance(device, str) else device
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def precision_used(train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """What a run on ``device`` computes in, for ``metrics.json``: its autocast dtype (None: float32) and whether
    float32 matmuls and cuDNN convolutions use TF32 (torch's flags now: call inside :func:`tf32_mode`)."""
    cuda = device.type == "cuda"
    return {"device": device.type, "autocast": "bfloat16" if cuda and train.amp else None,
            "tf32_matmul": cuda and bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": cuda and bool(torch.backends.cudnn.allow_tf32)}  # fmt: skip


def _normalization(cfg: RunConfig, dcfg: dict) -> tuple[Any, Any]:
    choice = cfg.data.normalize
    if choice == "backbone":
        return dcfg["mean"], dcfg["std"]
    if choice == "none":
        return None, None
    if choice == "imagenet":
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if choice == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    raise ConfigError(f"data.normalize={choice!r}; valid: backbone, none, imagenet, half")


def build_transforms(cfg: RunConfig, dcfg: dict, device_resize: bool = False) -> tuple[Callable, Callable]:
    """(train, test) transforms of ``cfg.data`` for a backbone with timm data config ``dcfg``; with
    ``device_resize`` their native-resolution form (``retain.data.device_resize``: batches resized on ``.to``)."""
    d = cfg.data
    size = d.image_size or dcfg["input_size"][-1]
    mean, std = _normalization(cfg, dcfg)
    common = dict(image_size=size, mean=mean, std=std, resize=d.resize, interpolation=d.interpolation)
    build = build_transform
    if device_resize:
        if d.augment in ("crop_flip", "resize_pad_rrc"):
            raise ConfigError(f"data.device_resize=true cannot do data.augment={d.augment} (its crop works on the "
                              "resized image, at the output size); use data.augment=rrc or pad_rrc, or "
                              "data.device_resize=false")  # fmt: skip
        build = build_native_transform
    return build(True, augment=d.augment, rrc_scale=d.rrc_scale, **common), build(False, **common)


def build_datasets(cfg: RunConfig, dcfg: dict) -> tuple[Dataset, Dataset, Dataset]:
    """(train with train transform, test, train with test transform) for ``cfg.data``; image files are checked
    first (``data.bad_images``)."""
    d = cfg.data
    train_tf, test_tf = build_transforms(cfg, dcfg, device_resize=d.device_resize)
    options = dict(d.options)
    if d.name == "imagefolder" and "manifest" not in options:
        options["manifest"] = str(Path(cfg.out_dir) / cfg.name / "split_manifest.json")
    kw = dict(root=d.root, download=d.download, cache_dir=d.cache_dir, **options)
    skip = d.bad_images == "skip"
    train = check_images_once(create_dataset(d.name, "train", **kw), skip)
    test = check_images_once(create_dataset(d.name, "test", **kw), skip)
    return train.with_transform(train_tf), test.with_transform(test_tf), train.with_transform(test_tf)


def _dropped(paths: list[str], kept: list[str]) -> list[int]:
    """Indices of ``paths`` missing from ``kept`` (``paths`` in order with some left out)."""
    out, j = [], 0
    for i, p in enumerate(paths):
        if j < len(kept) and kept[j] == p:
            j += 1
        else:
            out.append(i)
    return out


def check_images_once(dataset: ImageDataset, skip: bool) -> ImageDataset:
    """:func:`retain.data.check_images` with every file opened once over all processes: each process checks a
    contiguous share of the files and the shares' results are gathered (int64 tensors), so every process raises the
    same UnreadableImageError (the first unreadable file in dataset order, as one process names it) or keeps the
    same files (rank 0 alone warns). One process, or a dataset without files: ``check_images`` itself."""
    if not distributed.active() or dataset.paths is None:
        return check_images(dataset, skip)
    lo, hi = distributed.shard_bounds(len(dataset))
    share = ImageDataset(dataset.targets[lo:hi], dataset.classes, paths=dataset.paths[lo:hi])
    error: Exception | None = None
    try:
        kept = check_images(share, skip, warn=lambda _: None).paths
        status, payload = 0, [lo + i for i in _dropped(share.paths, kept)]
    except Exception as e:  # noqa: BLE001 - shared with the other processes, then raised
        error, status = e, 1 if isinstance(e, UnreadableImageError) else 2
        payload = list(str(e).encode("utf-8", "surrogateescape"))
    head = distributed.gather_rows(torch.tensor([[status, len(payload)]], dtype=torch.int64))  # (processes, 2)
    lengths = head[:, 1].tolist()
    mine = torch.tensor(payload, dtype=torch.int64) if payload else None
    flat = distributed.gather_rows(mine) if sum(lengths) else torch.empty(0, dtype=torch.int64)
    parts = torch.split(flat, lengths)
    for r, (code, part) in enumerate(zip(head[:, 0].tolist(), parts, strict=True)):
        if code and r == distributed.rank() and error is not None:
            raise error
        if code:
            msg = bytes(part.tolist()).decode("utf-8", "surrogateescape")
            raise UnreadableImageError(msg) if code == 1 else RuntimeError(f"rank {r} checking image files: {msg}")
    bad = torch.cat(parts).tolist()  # ascending: the shares in rank order
    return drop_images(dataset, bad, None if distributed.is_main() else lambda _: None)


def retention_datasets(cfg: RunConfig, like: Dataset) -> tuple[Dataset, Dataset] | None:
    """(train, test) of the retention dataset with ``like``'s transform, or None when no probe is configured."""
    r = cfg.data.retention
    if r.name is None:
        return None
    kw = dict(root=r.root, cache_dir=cfg.data.cache_dir, **r.options)
    tf, skip = like.transform, cfg.data.bad_images == "skip"
    return (check_images_once(create_dataset(r.name, "train", **kw), skip).with_transform(tf),
            check_images_once(create_dataset(r.name, "test", **kw), skip).with_transform(tf))  # fmt: skip


def build_model(cfg: RunConfig, scenario: Scenario | None = None,
                classes_per_task: list[int] | None = None) -> ContinualModel:  # fmt: skip
    """Backbone (without classifier) + one linear head per task, on the CPU."""
    m = cfg.model
    backbone = create_backbone(m.backbone, pretrained=m.pretrained, weights=m.weights, **m.kwargs)
    sizes = scenario.classes_per_task if scenario is not None else classes_per_task
    return ContinualModel(backbone, TaskHeads(backbone.num_features, sizes))


def build_method(cfg: RunConfig, model: ContinualModel, scenario: Scenario) -> Method:
    """The configured method around ``model``; its constructor applies its model surgery (adapters) on the CPU."""
    return METHODS.get(cfg.method.name)(cfg.method, model, scenario, cfg.train)


def probe_backbone(cfg: RunConfig) -> nn.Module:
    """The backbone at random init, read for its data config; ``build_run`` makes it first (it draws the RNG)."""
    m = cfg.model
    return create_backbone(m.backbone, pretrained=False, **m.kwargs)


def rebuild_method(cfg: RunConfig, scenario: Scenario) -> Method:
    """The method as ``build_run`` builds it, without data: seeded, the same draws from the RNG (the probe backbone,
    the model, the method's surgery), so the same initial weights; on the CPU."""
    seed_everything(cfg.seed)
    probe_backbone(cfg)
    return build_method(cfg, build_model(cfg, scenario), scenario)


def build_run(cfg: RunConfig, device: torch.device | None = None) -> tuple[Scenario, Method]:
    """Data, scenario, model and method for ``cfg`` (no training); the adapted model is then moved to ``device``."""
    device = device or resolve_device(cfg.train.device)
    if cfg.train.schedule == "plateau" and cfg.scenario.val_fraction <= 0:
        raise ConfigError("train.schedule=plateau needs a validation split: set scenario.val_fraction > 0 "
                          "(FACIL uses 0.1)")  # fmt: skip
    m = cfg.model
    check_sha256(m.backbone, m.pretrained, m.weights, m.sha256)
    dcfg = data_config(probe_backbone(cfg))
    train, test, train_eval = build_datasets(cfg, dcfg)
    n = len(train.classes)
    if cfg.data.num_classes is not None and cfg.data.num_classes != n:
        where = f"{cfg.data.name} at {cfg.data.root}" if cfg.data.root else cfg.data.name
        raise ConfigError(f"data.num_classes={cfg.data.num_classes} but {where} has {n} classes; point data.root at "
                          f"the dataset the preset expects, or set data.num_classes={n}")  # fmt: skip
    scenario = create_scenario(train, test, cfg.scenario, train_eval, seed=cfg.seed)
    method = build_method(cfg, build_model(cfg, scenario), scenario)
    return scenario, method.to(device)
