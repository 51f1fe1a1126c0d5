"""LoRA on the query and value projections (Hu et al., ICLR 2022), as in Bafghi, Harilal, Monteleoni, Raissi,
"Parameter Efficient Fine-tuning of Self-supervised ViTs without Catastrophic Forgetting", CVPRW 2024.

timm fuses q, k, v into one linear; it is first split into three exactly equivalent linears
(``retain.models.adapters.split_qkv``, names ``attn.qkv.q`` / ``k`` / ``v``), then the peft library puts a LoRA
adapter on ``q`` and ``v`` of every block: rank ``r``, ``alpha = r`` (scaling 1), no dropout, A Kaiming-uniform and
B = 0, so the adapted ViT computes the pre-trained function at init. Trained: the LoRA matrices and a fresh
classifier. For inference (inside ``deployed()``: every evaluation, the retention probe, a loaded artefact) each
block's q/k/v with the deployed adapter's ``B A`` added is fused back into one plain linear, so the deployed model
is a plain timm ViT (no extra cost); the split modules and their un-merged weights come back for training, so
nothing drifts across merges.

Continual use: with ``per_task`` every task owns a peft adapter (``task_<t>``) chosen by task id (task-IL, and the
single task of the fine-tuning protocol); in class-IL one adapter (``shared``) is trained on each task in turn.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from timm.layers import Attention
from torch import nn

from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import ContinualModel, MethodConfig, register_method
from retain.methods.per_task import PerTaskMethod
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
class LoRA(PerTaskMethod):
    """peft LoRA on the split q and v projections of a frozen timm ViT; see the module docstring.

    Routing: task t's adapter is the one peft's layers run (training, un-merged), or the one fused into plain
    linears while ``deployed()`` (inference)."""

    config_class = LoRAConfig

    def __init__(self, cfg: LoRAConfig, model: ContinualModel, scenario: Scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        _check(cfg)
        self.adapters = [f"task_{t}" for t in range(scenario.n_tasks)] if self.per_task else ["shared"]
        try:
            split_qkv(model.backbone)
        except ValueError as e:
            raise ConfigError(f"lora needs a timm ViT backbone: {e}") from None
        self.attentions = [m for m in model.backbone.modules() if isinstance(m, Attention) and isinstance(m.qkv, QKV)]
        self.qkv = [m.qkv for m in self.attentions]  # the split modules, kept while a fused linear is deployed
        self._inject(model.backbone)
        self.fused: str | None = None  # adapter fused into plain linears (inference), None: split (training)
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

    def owned(self, t: int) -> list[str]:
        return [f"backbone.*.lora_A.{self.adapter_of(t)}.*", f"backbone.*.lora_B.{self.adapter_of(t)}.*"]

    def task_state(self, task: Task) -> dict[str, torch.Tensor]:
        with self._split():
            return super().task_state(task)

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        self.unfuse()
        super().before_task(task)

    @contextmanager
    def deployed(self) -> Iterator[None]:
        """The latest (or shared) adapter fused into plain linears; the split modules back on exit."""
        self.fuse(self.adapter_of(self.deployed_task(None)))
        try:
            yield
        finally:
            self.unfuse()

    # ---- routing: the active adapter (training) or the fused one (inference) --------------------------------------
    def route(self, task: int) -> None:
        adapter = self.adapter_of(task)
        if self.fused is not None:
            self.fuse(adapter)
        else:
            self._activate(adapter)

    @contextmanager
    def routed(self, task: int) -> Iterator[None]:
        """Task ``task``'s adapter for the duration: re-fused if fused (and left so: every prediction routes), else
        peft's un-merged path, then the previous adapter."""
        if self.fused is not None:
            self.fuse(self.adapter_of(task))
            yield
            return
        previous = self.current
        self._activate(self.adapter_of(task))
        try:
            yield
        finally:
            self._activate(previous)

    def _activate(self, adapter: str) -> None:
        """Make ``adapter`` the one peft's layers run (and mark trainable; the engine re-marks per stage)."""
        for layer in lora_layers(self.model.backbone):
            layer.set_adapter(adapter)
        self.current = adapter

    @torch.no_grad()
    def fuse(self, adapter: str) -> None:
        """Replace every split q/k/v by one plain linear with ``adapter``'s LoRA merged (inference)."""
        if self.fused == adapter:
            return
        for attn, qkv in zip(self.attentions, self.qkv, strict=True):
            attn.qkv = _fused(qkv, adapter)
        self.fused = adapter

    def unfuse(self) -> None:
        """Put the split q/k/v with their LoRA layers back (training); the base weights were never modified."""
        if self.fused is None:
            return
        for attn, qkv in zip(self.attentions, self.qkv, strict=True):
            attn.qkv = qkv
        self.fused = None

    @contextmanager
    def _split(self) -> Iterator[None]:
        """The split (training) modules in place for the duration, whatever was fused."""
        fused = self.fused
        self.unfuse()
        try:
            yield
        finally:
            if fused is not None:
                self.fuse(fused)

    # ---- checkpoint -----------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Every adapter's LoRA matrices and the heads (read from the split modules, whatever is fused)."""
        with self._split():
            return super().checkpoint_state()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        with self._split():
            super().load_checkpoint_state(state)


def _check(cfg: LoRAConfig) -> None:
    if cfg.r < 1:
        raise ConfigError(f"method.r={cfg.r}; the LoRA rank must be >= 1")
    if not cfg.targets or not set(cfg.targets) <= set(PROJECTIONS) or len(set(cfg.targets)) != len(cfg.targets):
        raise ConfigError(f"method.targets={cfg.targets}; a non-empty subset of {list(PROJECTIONS)}")
