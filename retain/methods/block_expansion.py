"""Block Expansion (Bafghi, Harilal, Monteleoni, Raissi, "Parameter Efficient Fine-tuning of Self-supervised ViTs
without Catastrophic Forgetting", CVPRW 2024).

The N pre-trained blocks are grouped in sets of ``split`` (M); after each set a copy of its top block is inserted
whose attention output projection and MLP ``fc2`` (weights and biases) are zero, so the expanded ViT computes exactly
the pre-trained function at init (``retain.models.adapters.expand_blocks``). Only the p = N // M new blocks and a
fresh classifier train; embeddings, original blocks and the final norm stay frozen.

Continual use: with ``per_task`` every task owns its own copy of the new blocks (``backbone.blocks.<i>.tasks.<t>``),
chosen by task id (task-IL, and the single task of the fine-tuning protocol); in class-IL one shared set of new
blocks is trained on each task in turn. When the training transform is deterministic, the output of the frozen
blocks below the first new one can be computed once per task and cached (``cache_prefix``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import ContinualModel, Method, MethodConfig, Stage, register_method
from retain.models.adapters import expand_blocks, set_task, use_task

__all__ = ["BlockExpansionConfig", "BlockExpansion", "TaskBlock", "resolve_per_task", "deterministic_train",
           "backbone_ref"]  # fmt: skip


@dataclass
class BlockExpansionConfig(MethodConfig):
    name: str = "block_expansion"
    train_mask: str = "current"  # class-IL (shared weights): CE over the current task's classes, its head only
    split: int | None = None  # M: a copy after every M-th block, p = N // M new blocks; None: M = N (one, on top)
    per_task: bool | None = None  # own new blocks per task, by task id; None: yes in task_il/finetune, no in class_il
    cache_prefix: bool | None = None  # train on cached frozen-prefix tokens; None: when exact and under cache_max_gb
    cache_max_gb: float = 2.0  # auto mode: largest prefix cache (float32 tokens of a task's training images)
    export_path: str | None = None  # after each task, write the new blocks and heads (``export``) to this file


class TaskBlock(nn.Module):
    """Per-task copies of one inserted block (``tasks.<t>``); ``set_task(t)`` chooses the one that runs."""

    def __init__(self, block: nn.Module, n_tasks: int) -> None:
        super().__init__()
        self.tasks = nn.ModuleList(copy.deepcopy(block) for _ in range(n_tasks))
        self.task = 0

    def set_task(self, task: int) -> None:
        if not isinstance(task, int) or not 0 <= task < len(self.tasks):
            raise ValueError(f"TaskBlock.set_task needs a task index in 0..{len(self.tasks) - 1}, got {task!r}")
        self.task = task

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.tasks[self.task](x, **kwargs)  # (B, L, D)


def resolve_per_task(per_task: bool | None, scenario: Scenario, method: str) -> bool:
    """``per_task`` with None resolved by protocol; per-task weights in class-IL would need a task-id predictor."""
    if per_task is None:
        return scenario.protocol != "class_il"
    if per_task and scenario.protocol == "class_il":
        raise ConfigError(f"method.per_task=true needs the task id at test time (scenario.protocol=task_il or "
                          f"finetune); class-IL {method} trains one shared set (method.per_task=false)")  # fmt: skip
    return per_task


def deterministic_train(task: Task) -> bool | None:
    """Whether ``task.train`` and ``task.train_eval`` use the same transform (None: cannot tell)."""
    train, ref = getattr(task.train, "base", None), getattr(task.train_eval, "base", None)
    tf_train, tf_ref = getattr(train, "transform", None), getattr(ref, "transform", None)
    if train is None or ref is None:
        return None
    return repr(tf_train) == repr(tf_ref)


def backbone_ref(backbone: nn.Module) -> str:
    """``architecture.tag`` of a timm backbone (what an export must be loaded into)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture", type(backbone).__name__), cfg.get("tag")
    return f"{arch}.{tag}" if tag else arch


@register_method
class BlockExpansion(Method):
    """Identity-initialised blocks inserted into a frozen timm ViT; see the module docstring."""

    config_class = BlockExpansionConfig

    def __init__(self, cfg: BlockExpansionConfig, model: ContinualModel, scenario: Scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        vit = model.backbone
        self.per_task = resolve_per_task(cfg.per_task, scenario, self.name)
        self.task_aware_predict = self.per_task
        if not isinstance(getattr(vit, "blocks", None), nn.Sequential | nn.ModuleList):
            raise ConfigError(f"block_expansion needs a timm ViT backbone (blocks), got {type(vit).__name__}")
        self.split = len(vit.blocks) if cfg.split is None else cfg.split
        try:
            self.new_blocks = expand_blocks(vit, self.split)  # indices in the expanded ViT
        except ValueError as e:
            raise ConfigError(f"method.split={cfg.split}: {e}") from None
        if self.per_task:
            for i in self.new_blocks:
                vit.blocks[i] = TaskBlock(vit.blocks[i], scenario.n_tasks)
        self.prefix_cached: list[int] = []  # tasks trained on cached prefix tokens (tests, benchmarks)

    # ---- parameters -----------------------------------------------------------------------------------------------
    def block_prefixes(self, t: int) -> list[str]:
        """Name prefixes of the new blocks task ``t`` trains (its own copies, or the shared ones)."""
        own = f".tasks.{t}." if self.per_task else "."
        return [f"backbone.blocks.{i}{own}" for i in self.new_blocks]

    def trainable_prefixes(self, task: Task) -> list[str]:
        own = self.per_task or self.cfg.train_mask == "current"  # else (train_mask=seen) the seen heads
        heads = [f"head.heads.{task.index}."] if own else self.seen_heads(task)
        return [*self.block_prefixes(task.index), *heads]

    def bytes_per_task(self, task: Task) -> int:
        """The task's head rows, plus its own new blocks when they are per task (shared ones are the model)."""
        params = dict(self.model.named_parameters())
        names = [n for n in params if n.startswith(f"head.heads.{task.index}.")]
        if self.per_task:
            names += [n for n in params if n.startswith(tuple(self.block_prefixes(task.index)))]
        return sum(params[n].numel() * params[n].element_size() for n in names)

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._route(task.index)

    def stages(self, task: Task) -> list[Stage]:
        cached = self.use_prefix_cache(task)
        data = (lambda: self.prefix_dataset(task)) if cached else None
        return [Stage("train", self.train_cfg.epochs, self.trainable_prefixes(task), steps=self.train_cfg.steps,
                      data=data, extra={"prefix_cached": cached})]  # fmt: skip

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        if not stage.extra.get("prefix_cached"):
            return super().loss(batch, stage)
        tokens, y = batch  # (B, L, D) frozen-prefix output, (B,)
        logits = self.mask_logits(self.model.head(self.suffix_features(tokens)), y)  # (B, C)
        return {"ce": F.cross_entropy(logits, y, label_smoothing=self.train_cfg.label_smoothing)}

    def after_task(self, task: Task) -> None:
        self.export_after_task()

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self._route(last_task.index)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> torch.Tensor:
        """Logits with the new blocks of ``task_id`` (per task; None: the latest task's) or the shared ones."""
        with use_task(self.model.backbone, self._deployed(task_id)):
            return self.model(x)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) CLS after the final norm with the latest task's new blocks: what the retention k-NN probes."""
        with use_task(self.model.backbone, self._deployed(None)):
            return self.model.features(x)

    def _deployed(self, task_id: int | None) -> int:
        if task_id is not None and self.per_task:
            return task_id
        return self.task.index if (self.per_task and self.task is not None) else 0

    def _route(self, t: int) -> None:
        if self.per_task:
            set_task(self.model.backbone, t)

    # ---- frozen-prefix cache --------------------------------------------------------------------------------------
    @property
    def first_trainable(self) -> int:
        """Index of the lowest new block: everything below it is frozen and deterministic."""
        return self.new_blocks[0]

    def prefix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens entering the first new block (timm's ``forward_features`` up to there)."""
        vit = self.model.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, L, D)
        for blk in vit.blocks[: self.first_trainable]:
            x = blk(x)
        return x

    def suffix_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features from prefix tokens (B, L, D): the rest of the blocks, final norm, pooling."""
        vit = self.model.backbone
        for blk in vit.blocks[self.first_trainable :]:
            tokens = blk(tokens)
        return vit.forward_head(vit.norm(tokens), pre_logits=True)

    def use_prefix_cache(self, task: Task) -> bool:
        """Whether ``task`` trains on cached prefix tokens: ``cache_prefix``, or in auto mode when that is exact
        (same transform for training and evaluation, no dropout below the first new block) and fits the budget."""
        if self.cfg.cache_prefix is False or task.train is None:
            return False
        exact = deterministic_train(task) is True and not _stochastic(self._prefix_modules())
        if self.cfg.cache_prefix:
            if not exact:
                raise ConfigError("method.cache_prefix=true needs a deterministic training transform "
                                  "(data.augment=none) and no dropout below the first new block")  # fmt: skip
            return True
        return exact and self.prefix_cache_bytes(task) <= self.cfg.cache_max_gb * 2**30

    def prefix_cache_bytes(self, task: Task) -> int:
        vit = self.model.backbone
        n_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
        return len(task.train) * n_tokens * vit.embed_dim * 4

    def _prefix_modules(self) -> list[nn.Module]:
        vit = self.model.backbone
        return [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre, *vit.blocks[: self.first_trainable]]

    def prefix_dataset(self, task: Task) -> Dataset:
        """(tokens (N, L, D), labels) of the task's training images (deterministic transform), computed once."""
        self.prefix_cached.append(task.index)
        return self.extract_features(task.train_eval, forward=self.prefix_tokens)

    # ---- checkpoint and export ------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Heads and the new blocks trained so far (untrained per-task copies are rebuilt from the backbone)."""
        upto = self.task.index if self.task is not None else 0
        keep = tuple(p for t in range(upto + 1) for p in self.block_prefixes(t)) + ("head.",)
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(keep)}

    def export(self, path: str | Path) -> None:
        """One safetensors file: the trained new blocks and heads, with the backbone reference and split."""
        n = self.task.index + 1 if self.task is not None else 0
        heads = tuple(f"head.heads.{t}." for t in range(n))
        state = {k: v.detach().cpu().contiguous() for k, v in self.checkpoint_state().items()
                 if not k.startswith("head.") or k.startswith(heads)}  # fmt: skip
        meta = {"method": self.name, "backbone": backbone_ref(self.model.backbone), "split": str(self.split),
                "per_task": str(self.per_task), "tasks_trained": str(n)}  # fmt: skip
        save_file(state, str(path), metadata=meta)

    @torch.no_grad()
    def load_export(self, path: str | Path) -> None:
        """Load ``export``'s file into this method's model (same backbone, split and per_task); ready to predict."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        mine = (backbone_ref(self.model.backbone), str(self.split), str(self.per_task))
        if (meta.get("backbone"), meta.get("split"), meta.get("per_task")) != mine:
            raise ValueError(
                f"{path} holds blocks for {meta.get('backbone')} split {meta.get('split')} per_task "
                f"{meta.get('per_task')}; this model is {mine[0]} split {mine[1]} per_task {mine[2]}"
            )
        self.load_checkpoint_state(load_file(str(path), device=str(self.device)))
        n = int(meta["tasks_trained"])
        self.task = self.scenario.tasks[n - 1] if n else None
        self.model.head.n_active = max(n, 1)
        self._route(max(n - 1, 0))


def _stochastic(modules: list[nn.Module]) -> bool:
    """Whether any dropout or stochastic depth with a non-zero rate is inside ``modules``."""
    for m in (sub for mod in modules for sub in mod.modules()):
        if isinstance(m, nn.modules.dropout._DropoutNd):
            rate = m.p
        else:  # timm's DropPath (drop_prob) and PatchDropout (prob)
            rate = getattr(m, "drop_prob", 0) or getattr(m, "prob", 0)
        if rate:
            return True
    return False
