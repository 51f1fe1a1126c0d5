"""Export a run's model as a plain timm model: one safetensors state dict that timm loads with no retain installed.

Where what a method deploys is a plain timm architecture (fine-tuning, linear probe, joint, LwF, EWC, PAD, LoRA
merged into the weights, Block Expansion as a ViT of depth N + p), ``export_timm`` writes the backbone as deployed
and one linear head over the classes predicted (class-incremental: the seen tasks' heads concatenated, in class
order; task-incremental: task ``--task T``'s model and head), and records in the file's metadata how to build it::

    meta = safe_open(PATH, "pt").metadata()
    overlay = json.loads(meta["timm_pretrained_cfg_overlay"])
    model = timm.create_model(meta["timm_model"], pretrained=True, pretrained_cfg_overlay=dict(file=PATH, **overlay),
                              **json.loads(meta["timm_kwargs"]))

(the overlay carries ``num_classes``: without it timm drops a head whose size differs from the tag's, and the
input size, normalisation and class names of the run). Before the file is written the model is built that way and
its logits checked against the method's own prediction. Methods whose prediction is not one timm forward pass
(selection by keys or prompts, per-task BatchNorm statistics, cosine prototypes) are refused with the reason.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from retain.artefact import _read_run, restore_run
from retain.config import RunConfig
from retain.engine.build import _normalization, probe_backbone
from retain.engine.context import RunError
from retain.methods.base import Method
from retain.methods.block_expansion import TaskBlock
from retain.methods.per_task import PerTaskMethod
from retain.models import data_config
from retain.models.vit import VIT32_ARCHS

__all__ = ["TIMM_FORMAT", "NOT_PLAIN", "export_timm"]

TIMM_FORMAT = "timm-state-dict"
TOLERANCE = 1e-4  # largest logit difference allowed between the timm model and the method (``_verify``, float32)
_INSTEAD = "export the default format (`retain export RUN_DIR -o FILE`) and load it with retain.load"

# method -> why its deployed model is not one timm forward pass
NOT_PLAIN = {
    "ln_tuning": "each image picks a task by key similarity (a second, frozen pass) and runs with that task's "
    "LayerNorm rows",
    "confit": "an old task predicts with its own BatchNorm state, its means recomputed through the current "
    "convolutions (Xconv BN)",
    "l2p": "prompts chosen per image by a frozen query pass are prepended to the ViT's tokens",
    "dualprompt": "prompts chosen per image by a frozen query pass are inserted into the ViT's attention",
    "coda_prompt": "prompts weighted per image by a frozen query pass are inserted into the ViT's attention",
    "simplecil": "its logits are cosine similarities (features L2-normalised before the prototype head), which a "
    "timm linear head does not compute",
}


def _timm_arch(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """(a model name timm itself knows, kwargs) building the run's backbone architecture; RunError for retain's own
    architectures that timm has no equivalent of."""
    arch = cfg.model.backbone.split(".")[0]
    if arch in VIT32_ARCHS:  # retain's 32-px ViTs are timm's VisionTransformer with other sizes
        dim, depth, heads, mlp = VIT32_ARCHS[arch]
        base = dict(img_size=32, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp)
        return "vit_tiny_patch16_224", base | dict(cfg.model.kwargs)
    if timm.models.model_entrypoint(arch).__module__.startswith("retain."):
        raise RunError(f"cannot export to timm: backbone {arch} is retain's own architecture, which timm does not "
                       f"know; {_INSTEAD}")  # fmt: skip
    return cfg.model.backbone, dict(cfg.model.kwargs)


def _check_exportable(cfg: RunConfig, protocol: str, n_tasks: int, task: int | None) -> None:
    name = cfg.method.name
    if name in NOT_PLAIN:
        raise RunError(f"cannot export {name} to timm: {NOT_PLAIN[name]}; {_INSTEAD}")
    if protocol == "task_il" and task is None:
        raise RunError("cannot export a task-incremental run to timm as one model: it predicts through the head "
                       "(and, per task, the weights) of each image's task; export one task's model with --task T, "
                       f"or {_INSTEAD}")  # fmt: skip
    if task is not None and protocol == "class_il":
        raise RunError("--task applies to task-incremental runs; a class-incremental run exports one model over "
                       "every class seen (drop --task)")  # fmt: skip
    if task is not None and not 0 <= task < n_tasks:
        raise RunError(f"--task {task}: the run has finished tasks 0..{n_tasks - 1}")


def _plain_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict as a plain timm model names it: each per-task block (``TaskBlock``) reduced to the
    copy it runs (``blocks.<i>.tasks.<t>.x`` -> ``blocks.<i>.x``)."""
    state = backbone.state_dict()
    for prefix, m in backbone.named_modules():
        if isinstance(m, TaskBlock):
            mine, chosen = f"{prefix}.tasks.", f"{prefix}.tasks.{m.task}."
            state = {(f"{prefix}." + k[len(chosen) :] if k.startswith(chosen) else k): v
                     for k, v in state.items() if k.startswith(chosen) or not k.startswith(mine)}  # fmt: skip
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in state.items()}


def _head(method: Method, tasks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) of the heads of ``tasks`` stacked in class order: what their logits concatenate."""
    heads = [method.model.head.heads[t] for t in tasks]
    weight = torch.cat([h.weight.detach() for h in heads])  # (C, D)
    bias = torch.cat([h.bias.detach() if h.bias is not None else torch.zeros(h.out_features) for h in heads])  # (C,)
    return weight.float().cpu().contiguous(), bias.float().cpu().contiguous()


def _overlay(cfg: RunConfig, class_names: list[str]) -> dict[str, Any]:
    """The pretrained-cfg fields a timm user needs besides the file: head size, and the run's test transform."""
    dcfg = data_config(probe_backbone(cfg))
    size = cfg.data.image_size or dcfg["input_size"][-1]
    mean, std = _normalization(cfg, dcfg)
    return {"num_classes": len(class_names), "input_size": [3, size, size],
            "mean": list(mean) if mean is not None else [0.0, 0.0, 0.0],
            "std": list(std) if std is not None else [1.0, 1.0, 1.0], "interpolation": cfg.data.interpolation,
            "crop_pct": 0.875 if cfg.data.resize == "crop" else 1.0, "crop_mode": "center",
            "label_names": class_names}  # fmt: skip


def _verify(model: nn.Module, method: Method, task: int | None, lo: int, hi: int, size: int) -> float:
    """Largest |logit difference| between ``model`` and the method's prediction (columns lo:hi) on random images,
    relative to the largest |logit| when that is over 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=gen)
    with torch.no_grad():
        theirs = model.eval()(x)
        mine = method.predict(x, task).logits.float()[:, lo:hi]
    if theirs.shape != mine.shape:
        return float("inf")
    return (theirs - mine).abs().max().item() / max(1.0, mine.abs().max().item())


def export_timm(run_dir: str | Path, out: str | Path, task: int | None = None,
                weights: str | Path | None = None) -> dict[str, str]:  # fmt: skip
    """Write the run in ``run_dir`` as a timm state dict (safetensors) to ``out``; returns its metadata.

    ``task``: task-incremental runs, the task whose model (per-task weights, its head) to write. ``weights``
    replaces the run's ``model.weights``. RunError (one line, with what to use instead) where the deployed model is
    not a plain timm model. Metadata: ``timm_model``, ``timm_kwargs`` and ``timm_pretrained_cfg_overlay`` (the
    ``timm.create_model`` call, see the module docstring), ``class_names``, ``label_offset`` (the first exported
    logit's position in the run's class order), the method, backbone, tasks trained and the task exported.
    """
    cfg, info, _ = _read_run(Path(run_dir))
    n_tasks = len(info["classes_per_task"])
    _check_exportable(cfg, info["protocol"], n_tasks, task)
    name, kwargs = _timm_arch(cfg)
    method, cfg, info, n, _ = restore_run(run_dir, weights)
    _check_exportable(cfg, info["protocol"], n, task)
    scenario = method.scenario
    tasks = [task] if task is not None else list(range(n))
    lo = scenario.tasks[tasks[0]].offset
    hi = lo + sum(scenario.tasks[t].n_classes for t in tasks)
    class_names = scenario.class_names[lo:hi]
    method.model.eval()
    with method.deployed():
        route = method.routed(method.deployed_task(task)) if isinstance(method, PerTaskMethod) else nullcontext()
        with route:
            state = _plain_state(method.model.backbone)
            kwargs["num_classes"] = len(class_names)
            model = timm.create_model(name, pretrained=False, **kwargs)
            blocks = getattr(method.model.backbone, "blocks", None)
            if blocks is not None and len(getattr(model, "blocks", blocks)) != len(blocks):
                kwargs["depth"] = len(blocks)  # Block Expansion: a ViT of depth N + p
                model = timm.create_model(name, pretrained=False, **kwargs)
            classifier = model.pretrained_cfg.get("classifier") or "head"
            state[f"{classifier}.weight"], state[f"{classifier}.bias"] = _head(method, tasks)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                lines = str(e).splitlines()
                first = (lines[1] if len(lines) > 1 else lines[0]).strip()[:160]
                raise RunError(f"cannot export {cfg.method.name} to timm: its deployed model is not a plain {name} "
                               f"({first}); {_INSTEAD}") from None  # fmt: skip
            overlay = _overlay(cfg, class_names)
            meta = {"format": TIMM_FORMAT, "timm_model": name, "timm_kwargs": json.dumps(kwargs),
                    "timm_pretrained_cfg_overlay": json.dumps(overlay), "class_names": json.dumps(class_names),
                    "label_offset": str(lo), "method": cfg.method.name, "backbone": cfg.model.backbone,
                    "tasks_trained": str(n), "task": "" if task is None else str(task),
                    "timm_call": f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict("
                                 f"file=PATH, **timm_pretrained_cfg_overlay), **timm_kwargs)"}  # fmt: skip
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp.safetensors")
            try:
                save_file(model.state_dict(), str(tmp), metadata=meta)
                overlay_file = dict(file=str(tmp), **overlay)
                loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay_file, **kwargs)
                diff = _verify(loaded, method, task, lo, hi, overlay["input_size"][-1])
                if not diff <= TOLERANCE:
                    raise RunError(f"cannot export {cfg.method.name} to timm: the timm model's logits differ from "
                                   f"the method's prediction by {diff:.3g}; {_INSTEAD}")  # fmt: skip
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
    return meta
