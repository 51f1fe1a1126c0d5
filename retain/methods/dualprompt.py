"""DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning", ECCV 2022),
as the official JAX code (google-research/l2p) and its PyTorch port (JH-LEE-KR/dualprompt-pytorch, "DP-pt") run it;
PROMPTS.md §3.

Trained: a task-shared G-prompt (prefix-tuning of blocks 0-1), a pool of E-prompts (prefix-tuning of blocks 2-4; task
t trains slot t, chosen by its task id), one key per slot and the current task's head. Frozen: the whole ViT. At test
the frozen ViT's CLS (the query) picks the slot whose key is most cosine-similar (optionally one majority vote per
batch); the key loss pulls key t towards the queries of task t's images.

Prompts live in per-head key/value space: a block's prefix is (p_k, p_v), each (B, H, L, d_h), put in front of the
block's keys and values (``retain.models.prompting``). ``prefix_layout="dp_pt_bug"`` reproduces DP-pt's reshape of
the gathered E-prompts, which mixes the key/value and batch axes (PROMPTS.md §3.7), for comparison with its numbers.

CODA's re-implementation ("DualPrompt" in GT-RIPL/CODA-Prompt ``models/zoo.py``, PROMPTS.md §4.6) is these options:
``per_layer_keys`` (a key set per E block, each selecting its block's E-prompt on its own at test), ``key_reduction:
sum`` (Σ_layers Σ_b (1 - cos(q_b, k_t)) instead of -mean_b cos), ``prompt_init: coda`` (U[0, 1)), no
``shared_prompt_pool`` copy, G 3 + 3 and E 10 + 10 prefix rows (``g_length: 3``, ``e_length: 10``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import Batch, ContinualModel, MethodConfig, Prediction, Stage, register_method
from retain.methods.per_task import PerTaskMethod
from retain.models.prompting import Prefix, add_prefix_attention, prefixes
from retain.models.query import QueryService, frozen_cls, key_similarity

__all__ = ["DualPromptConfig", "DualPrompt", "select_prompts", "e_prefix_layout"]

LAYOUTS = ("correct", "dp_pt_bug")
INITS = {"dp_pt": (-1.0, 1.0), "jax": (0.0, 0.01), "coda": (0.0, 1.0)}  # DP-pt; Flax's uniform(); CODA's uniform_
KEY_REDUCTIONS = ("mean", "sum")


@dataclass
class DualPromptConfig(MethodConfig):
    name: str = "dualprompt"
    train_mask: str = "current"  # CE over the current task's classes (DP-pt's train_mask, PROMPTS.md §0.3)
    g_blocks: list[int] = field(default_factory=lambda: [0, 1])  # G-prompt blocks (g_prompt_layer_idx)
    g_length: int = 5  # L_g: key and value prefix vectors per G block each
    e_blocks: list[int] = field(default_factory=lambda: [2, 3, 4])  # E-prompt blocks (e_prompt_layer_idx)
    e_length: int = 5  # L_e: 5 CIFAR-100, 20 ImageNet-R
    pool_size: int | None = None  # M E-prompts and keys; None: the number of tasks (task t trains slot t)
    top_k: int = 1  # E-prompts per image (only 1: the task-id slot at training)
    key_weight: float = 1.0  # lambda of the key loss -lambda * mean_b cos(q_b, k_t) (pull_constraint_coeff)
    batchwise_prompt: bool = True  # test: one majority-vote slot per batch (CIFAR True, ImageNet-R False)
    seen_keys_only: bool = False  # test: select among the seen tasks' keys; False: the whole pool, as DP-pt / JAX
    prompt_init: str = "dp_pt"  # prompts and keys: dp_pt = U(-1, 1) | jax = U[0, 0.01) | coda = U[0, 1)
    shared_prompt_pool: bool = True  # task t > 0 starts from a copy of E-prompt t-1 (keys are not copied)
    prefix_layout: str = "correct"  # correct | dp_pt_bug (DP-pt's reshape of the gathered E-prompts, §3.7)
    cache_queries: bool = True  # test: the frozen query of each (deterministic) test image computed once per run
    per_layer_keys: bool = False  # a key set per E block, each selecting on its own at test (CODA's re-implementation)
    key_reduction: str = "mean"  # mean: -λ mean_b Σ_layers cos(q_b, k_t) | sum: λ Σ_layers Σ_b (1 - cos) (CODA)


def select_prompts(sim: torch.Tensor, batchwise: bool) -> torch.Tensor:
    """(B,) top-1 slot per sample of similarities (B, M); ``batchwise``: every sample gets the batch's most frequent
    top-1 slot (ties: the lowest slot), DP-pt's ``batchwise_prompt``."""
    ids = sim.argmax(dim=1)  # (B,)
    if batchwise:
        counts = torch.bincount(ids, minlength=sim.shape[1])  # (M,)
        ids = counts.argmax().expand_as(ids)  # (B,)
    return ids


def e_prefix_layout(e: torch.Tensor, layout: str) -> torch.Tensor:
    """E-prompts gathered per sample, (B, E, 2, L, H, d_h), as (E, B, 2, L, H, d_h) prefixes.

    The tensor is first put in DP-pt's gathered layout (E, 2, B, L, H, d_h) (top_k = 1). ``correct`` swaps the
    (2, B) axes; ``dp_pt_bug`` reshapes instead, so sample b gets rows 2b, 2b+1 of the flattened (kv, batch) axis.
    """
    B, E, _, L, H, d = e.shape
    gathered = e.permute(1, 2, 0, 3, 4, 5)  # (E, 2, B, L, H, d)
    if layout == "dp_pt_bug":
        return gathered.reshape(E, B, 2, L, H, d)  # (E, B, 2, L, H, d), kv and batch axes mixed
    return gathered.transpose(1, 2)  # (E, B, 2, L, H, d)


def _as_prefix(p: torch.Tensor) -> Prefix:
    """(B, 2, L, H, d_h) -> (p_k, p_v), each (B, H, L, d_h)."""
    return p[:, 0].permute(0, 2, 1, 3), p[:, 1].permute(0, 2, 1, 3)


@register_method
class DualPrompt(PerTaskMethod):
    """G- and E-prompt prefix-tuning with task keys; see the module docstring."""

    config_class = DualPromptConfig
    selects_task = True  # the E-prompt pool is per task in every protocol; task-IL uses the oracle slot
    row_tables = frozenset(["dp_e_prompts", "dp_keys"])  # slot t: task t's E-prompt and key

    def __init__(self, cfg: DualPromptConfig, model: ContinualModel, scenario: Scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        _check(cfg, scenario.n_tasks)
        vit = model.backbone
        self.g_blocks, self.e_blocks = _fit_blocks(cfg.g_blocks, cfg.e_blocks, len(vit.blocks))
        wrappers = add_prefix_attention(vit, sorted({*self.g_blocks, *self.e_blocks}))
        heads, dim = wrappers[0].base_layer.num_heads, vit.num_features
        M, lo_hi = cfg.pool_size or scenario.n_tasks, INITS[cfg.prompt_init]
        device = next(vit.parameters()).device
        shapes = {  # DP-pt shapes, the E pool with the slot first (a row table)
            "dp_g_prompts": (len(self.g_blocks), 2, cfg.g_length, heads, dim // heads),  # (G, 2, L_g, H, d)
            "dp_e_prompts": (M, len(self.e_blocks), 2, cfg.e_length, heads, dim // heads),  # (M, E, 2, L_e, H, d)
            "dp_keys": (M, len(self.e_blocks), dim) if cfg.per_layer_keys else (M, dim),  # (M, [E,] D)
        }
        for name, shape in shapes.items():
            model.register_parameter(name, nn.Parameter(torch.empty(shape, device=device).uniform_(*lo_hi)))
        self.query = QueryService(frozen_cls(vit))  # q(x): the backbone itself with no prefix set

    # ---- parameters -----------------------------------------------------------------------------------------------
    def owned(self, t: int) -> list[str]:
        """Task t owns slot t of the E-prompt pool and of the keys."""
        return sorted(self.row_tables)

    def trainable_prefixes(self, task: Task) -> list[str]:
        """The whole E pool and keys (only slot t gets a gradient), the shared G-prompt and task t's head: what
        DP-pt hands its optimiser (PROMPTS.md §5.1)."""
        return [*super().trainable_prefixes(task), "dp_g_prompts"]

    def stages(self, task: Task) -> list[Stage]:
        params = self.trainable_prefixes(task)  # no weight decay: it would move the other slots
        return [Stage("train", self.train_cfg.epochs, params, steps=self.train_cfg.steps, weight_decay=0.0)]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Heads, G-prompt, E pool and keys (the frozen backbone is rebuilt from its weights)."""
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(("head.", "dp_"))}

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        if self.cfg.shared_prompt_pool and task.index > 0:
            with torch.no_grad():
                self.model.dp_e_prompts[task.index].copy_(self.model.dp_e_prompts[task.index - 1])

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self.query.clear()

    def loss(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        """CE over the current task's classes with E-prompt t (the true task id), and the key loss on key t."""
        x, y = batch
        t = self.task.index
        terms = {}
        if self.cfg.key_weight:
            keys = self.model.dp_keys[t] if self.cfg.per_layer_keys else self.model.dp_keys[t : t + 1]  # (E or 1, D)
            sim = key_similarity(self.query(x, cache=False), keys)  # (B, E or 1)
            if self.cfg.key_reduction == "sum":
                terms["key"] = self.cfg.key_weight * (1.0 - sim).sum()
            elif self.cfg.per_layer_keys:
                terms["key"] = -self.cfg.key_weight * sim.sum(1).mean()
            else:
                terms["key"] = -self.cfg.key_weight * sim.mean()
        ids = torch.full((len(x),), t, dtype=torch.long, device=x.device)  # (B,)
        logits = self.mask_logits(self.model.head(self.prompted_features(x, ids)), y)  # (B, C)
        return {"ce": self.ce(logits, y), **terms}

    # ---- prompts --------------------------------------------------------------------------------------------------
    def prefix_map(self, ids: torch.Tensor) -> dict[int, Prefix]:
        """{block: (p_k, p_v)} for samples routed to E-prompt slots ``ids`` (B,), or per E block (E, B) with
        ``per_layer_keys``; a block that is both G and E (a backbone shallower than the layout) gets [G; E]."""
        g = self.model.dp_g_prompts  # (G, 2, L_g, H, d)
        if ids.ndim == 1:
            gathered = self.model.dp_e_prompts[ids]  # (B, E, 2, L_e, H, d)
        else:  # block j of sample b from slot ids[j, b]
            gathered = self.model.dp_e_prompts[ids.T, torch.arange(ids.shape[0], device=ids.device)]
        e = e_prefix_layout(gathered, self.cfg.prefix_layout)  # (E, B, 2, L_e, H, d)
        B = gathered.shape[0]
        parts: dict[int, list[Prefix]] = {}
        for i, block in enumerate(self.g_blocks):
            parts.setdefault(block, []).append(_as_prefix(g[i].unsqueeze(0).expand(B, *g.shape[1:])))
        for j, block in enumerate(self.e_blocks):
            parts.setdefault(block, []).append(_as_prefix(e[j]))
        return {b: (torch.cat([k for k, _ in ps], dim=2), torch.cat([v for _, v in ps], dim=2))
                for b, ps in parts.items()}  # fmt: skip

    def prompted_features(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, D) CLS features with the G-prompt and each sample's E-prompt ``ids`` (B,) or per E block (E, B)."""
        with prefixes(self.model.backbone, self.prefix_map(ids)):
            return self.model.features(x)

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) test-time E-prompt slots: top-1 cosine of the frozen query to the keys (the pool, or the seen
        tasks' keys), with the batchwise vote if configured; with ``per_layer_keys`` (E, B), each E block by its
        own keys."""
        keys = self.model.dp_keys
        if self.cfg.seen_keys_only:
            keys = keys[: (self.task.index if self.task is not None else 0) + 1]
        query = self.query(x, self.cfg.cache_queries)
        if self.cfg.per_layer_keys:
            return torch.stack([select_prompts(key_similarity(query, keys[:, j]), self.cfg.batchwise_prompt)
                                for j in range(keys.shape[1])])  # fmt: skip
        return select_prompts(key_similarity(query, keys), self.cfg.batchwise_prompt)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits with the selected E-prompts (``task_id`` given: that task's) and the selected slots (B,); with
        per-block selections, each sample's most frequent slot over the E blocks (ties: the lowest)."""
        ids = self.select(x) if task_id is None else torch.full((len(x),), task_id, device=x.device)
        logits = self.model.head(self.prompted_features(x, ids))
        if ids.ndim == 2:
            ids = F.one_hot(ids, self.model.dp_keys.shape[0]).sum(0).argmax(1)  # (B,)
        return Prediction(logits, ids)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) as deployed, for the retention probe: the plain backbone before the first task, afterwards CLS
        with the G-prompt and the test-time E-prompt selection."""
        if self.task is None:
            return self.model.features(x)
        return self.prompted_features(x, self.select(x))


def _fit_blocks(g_blocks: list[int], e_blocks: list[int], depth: int) -> tuple[list[int], list[int]]:
    """The G and E blocks a backbone of ``depth`` blocks has: an index past the last block becomes the last block
    (one warning); e.g. tiny test ViTs. A block may then be both G and E (its prefix is [G; E], as JAX allows)."""
    fit = [[min(i, depth - 1) for i in blocks] for blocks in (g_blocks, e_blocks)]
    if fit != [g_blocks, e_blocks]:
        warnings.warn(f"dualprompt: the backbone has {depth} blocks; G blocks {g_blocks} -> {sorted(set(fit[0]))}, "
                      f"E blocks {e_blocks} -> {sorted(set(fit[1]))}", stacklevel=3)  # fmt: skip
    return list(dict.fromkeys(fit[0])), list(dict.fromkeys(fit[1]))


def _check(cfg: DualPromptConfig, n_tasks: int) -> None:
    for key, value, valid in (("prefix_layout", cfg.prefix_layout, LAYOUTS), ("prompt_init", cfg.prompt_init, INITS),
                              ("key_reduction", cfg.key_reduction, KEY_REDUCTIONS)):  # fmt: skip
        if value not in valid:
            raise ConfigError(f"method.{key}={value!r}; valid: {', '.join(valid)}")
    if cfg.top_k != 1:
        raise ConfigError(f"method.top_k={cfg.top_k}; only 1 (DP-pt / JAX: the task-id slot at training)")
    if cfg.pool_size is not None and cfg.pool_size < n_tasks:
        raise ConfigError(f"method.pool_size={cfg.pool_size} < {n_tasks} tasks; task t trains slot t")
    for key, value, least in (
        ("e_length", cfg.e_length, 1),
        ("g_length", cfg.g_length, 1),
        ("key_weight", cfg.key_weight, 0),
    ):
        if value < least:
            raise ConfigError(f"method.{key}={value}; must be >= {least}")
    if not cfg.e_blocks:
        raise ConfigError("method.e_blocks=[]; DualPrompt needs at least one E-prompt block")
    blocks = [*cfg.g_blocks, *cfg.e_blocks]
    if len(set(blocks)) != len(blocks) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
        raise ConfigError(f"method.g_blocks={cfg.g_blocks}, e_blocks={cfg.e_blocks}: distinct block indices >= 0")
