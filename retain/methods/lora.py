"""LoRA on the query and value projections (Hu et al., ICLR 2022), as in Bafghi, Harilal, Monteleoni, Raissi,
"Parameter Efficient Fine-tuning of Self-supervised ViTs without Catastrophic Forgetting", CVPRW 2024.

timm fuses q, k, v into one linear; it is first split into three exactly equivalent linears
(``retain.models.adapters.split_qkv``, names ``attn.qkv.q`` / ``k`` / ``v``), then the peft library puts a LoRA
adapter on ``q`` and ``v`` of every block: rank ``r``, ``alpha = r`` (scaling 1), no dropout, A Kaiming-uniform and
B = 0, so the adapted ViT computes the pre-trained function at init. Trained: the LoRA matrices and a fresh
classifier. For inference (every evaluation, the retention probe) each block's q/k/v with the deployed adapter's
``B A`` added is fused back into one plain linear, so the deployed model is a plain timm ViT (no extra cost); the
split modules and their un-merged weights come back for training, so nothing drifts across merges.

Continual use: with ``per_task`` every task owns a peft adapter (``task_<t>``) chosen by task id (task-IL, and the
single task of the fine-tuning protocol); in class-IL one adapter (``shared``) is trained on each task in turn.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import Attention
from torch import nn

from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import ContinualModel, Method, MethodConfig, register_method
from retain.methods.block_expansion import backbone_ref, resolve_per_task
from retain.models.adapters import QKV, split_qkv

__all__ = ["LoRAConfig", "LoRA", "lora_layers", "merged_weight"]

PROJECTIONS = ("q", "k", "v")


@dataclass
class LoRAConfig(MethodConfig):
    name: str = "lora"
    train_mask: str = "current"  # class-IL (shared weights): CE over the current task's classes, its head only
    r: int = 4  # rank
    alpha: float | None = None  # None: alpha = r (scaling alpha / r = 1, the paper's setting)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # which of q, k, v get an adapter
    per_task: bool | None = None  # own adapter per task, by task id; None: yes in task_il/finetune, no in class_il
    export_path: str | None = None  # after each task, write the LoRA matrices and heads (``export``) to this file


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers inside ``model``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def merged_weight(linear: nn.Module, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in) with ``adapter``'s ``scaling * B A`` added, bias (out,)) of a plain or LoRA linear."""
    base = getattr(linear, "base_layer", linear)
    weight = base.weight.detach()
    if adapter is not None and adapter in getattr(linear, "lora_A", {}):
        weight = weight + linear.get_delta_weight(adapter).to(weight.dtype)  # (out, in)
    return weight, None if base.bias is None else base.bias.detach()


def _fused(qkv: QKV, adapter: str | None) -> nn.Linear:
    """One plain linear computing ``qkv`` with ``adapter`` merged: q, k, v rows stacked as timm's fused layout."""
    parts = [merged_weight(getattr(qkv, p), adapter) for p in PROJECTIONS]
    weight = torch.cat([w for w, _ in parts])  # (3 * attn_dim, dim)
    out_dim, in_dim = weight.shape
    linear = nn.Linear(in_dim, out_dim, bias=parts[0][1] is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0][1] is not None:
        linear.bias = nn.Parameter(torch.cat([b for _, b in parts]), requires_grad=False)  # (3 * attn_dim,)
    return linear


@register_method
class LoRA(Method):
    """peft LoRA on the split q and v projections of a frozen timm ViT; see the module docstring."""

    config_class = LoRAConfig

    def __init__(self, cfg: LoRAConfig, model: ContinualModel, scenario: Scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        _check(cfg)
        self.per_task = resolve_per_task(cfg.per_task, scenario, self.name)
        self.task_aware_predict = self.per_task
        self.adapters = [f"task_{t}" for t in range(scenario.n_tasks)] if self.per_task else ["shared"]
        try:
            split_qkv(model.backbone)
        except ValueError as e:
            raise ConfigError(f"lora needs a timm ViT backbone: {e}") from None
        self.attentions = [m for m in model.backbone.modules() if isinstance(m, Attention) and isinstance(m.qkv, QKV)]
        self.qkv = [m.qkv for m in self.attentions]  # the split modules, kept while a fused linear is deployed
        self._inject(model.backbone)
        self.deployed: str | None = None  # adapter fused into plain linears (inference), None: split (training)
        self.current = self.adapters[0]
        self._activate(self.current)

    def _inject(self, backbone: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        alpha = self.cfg.r if self.cfg.alpha is None else self.cfg.alpha
        pattern = rf".*\.attn\.qkv\.({'|'.join(re.escape(t) for t in self.cfg.targets)})"
        config = LoraConfig(r=self.cfg.r, lora_alpha=alpha, lora_dropout=self.cfg.dropout, bias="none",
                            target_modules=pattern)  # fmt: skip
        with warnings.catch_warnings():  # one adapter per task is intended
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            for name in self.adapters:
                inject_adapter_in_model(config, backbone, adapter_name=name)

    # ---- parameters -----------------------------------------------------------------------------------------------
    def adapter_of(self, t: int) -> str:
        return self.adapters[t] if self.per_task else self.adapters[0]

    def lora_patterns(self, t: int) -> list[str]:
        return [f"backbone.*.lora_A.{self.adapter_of(t)}.*", f"backbone.*.lora_B.{self.adapter_of(t)}.*"]

    def trainable_prefixes(self, task: Task) -> list[str]:
        own = self.per_task or self.cfg.train_mask == "current"  # else (train_mask=seen) the seen heads
        heads = [f"head.heads.{task.index}."] if own else self.seen_heads(task)
        return [*self.lora_patterns(task.index), *heads]

    def bytes_per_task(self, task: Task) -> int:
        """The task's head rows, plus its LoRA matrices when they are per task (a shared adapter is the model)."""
        with self._split():
            params = dict(self.model.named_parameters())
            names = [n for n in params if n.startswith(f"head.heads.{task.index}.")]
            if self.per_task:
                names += [n for n in params if f".{self.adapter_of(task.index)}." in n and ".lora_" in n]
            return sum(params[n].numel() * params[n].element_size() for n in names)

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.undeploy()
        self._activate(self.adapter_of(task.index))

    def after_task(self, task: Task) -> None:
        self.export_after_task()

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self._activate(self.adapter_of(last_task.index))

    def evaluating(self) -> None:
        self.deploy(self._latest())

    def training(self) -> None:
        self.undeploy()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """Logits with the adapter of ``task_id`` (per task; None: the latest task's) or the shared one, merged."""
        with self._using(self.adapter_of(task_id) if task_id is not None else self._latest()):
            return self.model(x)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) CLS after the final norm with the latest adapter merged: what the retention k-NN probes."""
        with self._using(self._latest()):
            return self.model.features(x)

    def _latest(self) -> str:
        return self.adapter_of(self.task.index) if self.task is not None else self.adapter_of(0)

    # ---- adapters: active (training) and deployed (fused, inference) ----------------------------------------------
    def _activate(self, adapter: str) -> None:
        """Make ``adapter`` the one peft's layers run (and mark trainable; the engine re-marks per stage)."""
        for layer in lora_layers(self.model.backbone):
            layer.set_adapter(adapter)
        self.current = adapter

    @torch.no_grad()
    def deploy(self, adapter: str) -> None:
        """Replace every split q/k/v by one plain linear with ``adapter``'s LoRA merged (inference)."""
        if self.deployed == adapter:
            return
        for attn, qkv in zip(self.attentions, self.qkv, strict=True):
            attn.qkv = _fused(qkv, adapter)
        self.deployed = adapter

    def undeploy(self) -> None:
        """Put the split q/k/v with their LoRA layers back (training); the base weights were never modified."""
        if self.deployed is None:
            return
        for attn, qkv in zip(self.attentions, self.qkv, strict=True):
            attn.qkv = qkv
        self.deployed = None

    @contextmanager
    def _using(self, adapter: str) -> Iterator[None]:
        """Run with ``adapter``: re-fused if deployed (evaluation), else peft's un-merged path, then restored."""
        if self.deployed is not None:
            self.deploy(adapter)
            yield
            return
        previous = self.current
        self._activate(adapter)
        try:
            yield
        finally:
            self._activate(previous)

    @contextmanager
    def _split(self) -> Iterator[None]:
        """The split (training) modules in place for the duration, whatever was deployed."""
        deployed = self.deployed
        self.undeploy()
        try:
            yield
        finally:
            if deployed is not None:
                self.deploy(deployed)

    # ---- checkpoint and export ------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Every adapter's LoRA matrices and the heads (the frozen backbone is rebuilt from its weights)."""
        with self._split():
            return {k: v for k, v in self.model.state_dict().items() if ".lora_" in k or k.startswith("head.")}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        with self._split():
            super().load_checkpoint_state(state)

    def export(self, path: str | Path) -> None:
        """One safetensors file: the LoRA matrices of the trained adapters and the trained heads, nothing else."""
        n = self.task.index + 1 if self.task is not None else 0
        keep = tuple(f".{self.adapter_of(t)}." for t in range(n))
        heads = tuple(f"head.heads.{t}." for t in range(n))
        state = {k: v.detach().cpu().contiguous() for k, v in self.checkpoint_state().items()
                 if k.startswith(heads) or (".lora_" in k and any(a in k for a in keep))}  # fmt: skip
        meta = {
            "method": self.name,
            "backbone": backbone_ref(self.model.backbone),
            "r": str(self.cfg.r),
            "alpha": str(self.cfg.r if self.cfg.alpha is None else self.cfg.alpha),
            "targets": ",".join(self.cfg.targets),
            "per_task": str(self.per_task),
            "tasks_trained": str(n),
        }
        save_file(state, str(path), metadata=meta)

    @torch.no_grad()
    def load_export(self, path: str | Path) -> None:
        """Load ``export``'s file into this method's model (same backbone, rank, targets); ready to predict."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        mine = {"backbone": backbone_ref(self.model.backbone), "r": str(self.cfg.r),
                "targets": ",".join(self.cfg.targets), "per_task": str(self.per_task)}  # fmt: skip
        theirs = {k: meta.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"{path} holds LoRA for {theirs}; this model is {mine}")
        self.load_checkpoint_state(load_file(str(path), device=str(self.device)))
        n = int(meta["tasks_trained"])
        self.task = self.scenario.tasks[n - 1] if n else None
        self.model.head.n_active = max(n, 1)
        self.undeploy()
        self._activate(self._latest())


def _check(cfg: LoRAConfig) -> None:
    if cfg.r < 1:
        raise ConfigError(f"method.r={cfg.r}; the LoRA rank must be >= 1")
    if not cfg.targets or not set(cfg.targets) <= set(PROJECTIONS) or len(set(cfg.targets)) != len(cfg.targets):
        raise ConfigError(f"method.targets={cfg.targets}; a non-empty subset of {list(PROJECTIONS)}")
