"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning", CVPR 2023), as in GT-RIPL/CODA-Prompt (PROMPTS.md §4).

Trained: a pool of M prompt components P (M, L, D) with keys K (M, D) and attention vectors A (M, D) in each prompted
block (default blocks 0-4), and the task's head. Task t owns the rows [t c, (t + 1) c) (c = M / T), Gram-Schmidt
initialised when the task starts and frozen afterwards (detached in the forward). Frozen: the backbone.

Per image, q = the frozen ViT's CLS after its final norm (no prompt, no gradient); per block, α_m = cos(q ⊙ A_m, K_m)
over the active rows (no softmax, may be negative), p = Σ_m α_m P_m, whose first L/2 rows prefix the attention's keys
and last L/2 its values. No task id at test: every seen task's rows contribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import Batch, ContinualModel, MethodConfig, Prediction, Stage, register_method
from retain.methods.per_task import PerTaskMethod
from retain.metrics import storage_rule
from retain.models.prompting import Prefix, add_prefix_attention, prefixes
from retain.models.query import QueryService, frozen_cls

__all__ = ["CODAPromptConfig", "CODAPrompt", "component_weights", "assemble", "split_prefix", "gram_schmidt",
           "ortho_penalty"]  # fmt: skip

POOL = ("coda_p", "coda_k", "coda_a")  # model parameters: components (n, M, L, D), keys and attention (n, M, D)
DEFAULT_BLOCKS = 5  # the original prompts blocks 0-4 (models/zoo.py L46)
INIT_SEED = 0xC0DA  # the Gram-Schmidt draws: a private generator per task, seeded from the run's seed


@dataclass
class CODAPromptConfig(MethodConfig):
    name: str = "coda_prompt"
    train_mask: str = "current"  # CE over the task's classes: past classes -inf, future ones sliced off (§4.4)
    pool_size: int = 100  # M components per prompted block, M // n_tasks per task (--prompt_param 100 8 0.0)
    prompt_length: int = 8  # L, even: the first L/2 rows prefix the keys, the last L/2 the values
    blocks: list[int] | None = None  # prompted blocks; None: 0..4 (all blocks of a ViT with fewer)
    ortho_weight: float = 0.0  # μ of the orthogonality penalty (released scripts: 0; the paper's 0.1 had a x1e-6)
    cache_queries: bool = True  # evaluation: q of each (deterministic) image computed once per run


# ---- the operations (PROMPTS.md §4.2, §4.3) -------------------------------------------------------------------------
def component_weights(q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """α = cos(q_b ⊙ A_m, K_m) (..., B, M) for queries q (B, D) and keys, attention vectors (..., M, D).

    No softmax, no normalisation over m. Computed as ``q @ (A ⊙ K̂)ᵀ / ‖q ⊙ A_m‖`` (the norm from ``q² @ (A²)ᵀ``), so
    no (B, M, D) tensor is formed; the norms are clamped at ``eps`` as ``F.normalize`` does.
    """
    num = q @ (a * F.normalize(k, dim=-1, eps=eps)).transpose(-1, -2)  # (..., B, M)
    den = ((q * q) @ (a * a).transpose(-1, -2)).clamp_min(eps * eps).sqrt()  # (..., B, M) = ‖q_b ⊙ A_m‖
    return num / den


def assemble(alpha: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Prompts Σ_m α_{b,m} P_m (..., B, L, D) from weights (..., B, M) and components (..., M, L, D)."""
    return torch.einsum("...bm,...mld->...bld", alpha, p)


def split_prefix(prompt: torch.Tensor, heads: int) -> Prefix:
    """(p_k, p_v), each (B, H, L/2, d_h): the first and last L/2 rows of prompts (B, L, D), split into heads."""
    B, L, D = prompt.shape
    half = prompt.reshape(B, 2, L // 2, heads, D // heads).permute(1, 0, 3, 2, 4)  # (2, B, H, L/2, d_h)
    return half[0], half[1]


def gram_schmidt(x: torch.Tensor, start: int, stop: int, generator: torch.Generator) -> torch.Tensor:
    """Rows (M, n) with [0, start) kept, [start, stop) fresh N(0, 1) draws made orthogonal to every row before them
    and scaled to unit norm, [stop, M) zero (§4.3). In float64 on the CPU, returned as ``x``.

    Orthogonal to the span of the earlier rows (trained rows need not be orthogonal to each other; the original
    projects on each of them in turn, which is exact only if they are). A row beyond the dimension n cannot be
    orthogonal to the rest: it stays its unit-norm draw.
    """
    rows = x.detach().to("cpu", torch.float64).clone()
    draws = torch.randn(stop - start, rows.shape[1], generator=generator, dtype=torch.float64)  # (f - s, n)
    basis = rows.new_zeros(0, rows.shape[1])  # (r, n) orthonormal basis of the rows so far
    for row in rows[:start]:
        basis = _extend(basis, row)[1]
    for i, draw in enumerate(draws):
        unit, basis = _extend(basis, draw)
        rows[start + i] = unit if unit is not None else draw / draw.norm()
    rows[stop:] = 0
    return rows.to(x)


def _extend(basis: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(v orthonormalised against ``basis`` (r, n), the basis with it), by classical Gram-Schmidt run twice; (None,
    basis) when v lies in its span."""
    r = v
    for _ in range(2):
        r = r - basis.T @ (basis @ r)  # (n,)
    if r.norm() <= 1e-10 * v.norm():
        return None, basis
    unit = r / r.norm()
    return unit, torch.cat([basis, unit[None]])


def ortho_penalty(x: torch.Tensor) -> torch.Tensor:
    """Σ over the leading axis of mean((X Xᵀ - I)²) for rows X (..., M, n) (models/zoo.py L197-198)."""
    gram = x @ x.transpose(-1, -2)  # (..., M, M)
    eye = torch.eye(x.shape[-2], device=x.device, dtype=x.dtype)
    return ((gram - eye) ** 2).mean(dim=(-2, -1)).sum()


# ---- the method -----------------------------------------------------------------------------------------------------
@register_method
class CODAPrompt(PerTaskMethod):
    """Decomposed, attention-weighted prefix prompts over per-task component rows; see the module docstring."""

    config_class = CODAPromptConfig
    compile_blocker = "prefixes set per batch inside the backbone's attention"

    def __init__(self, cfg: CODAPromptConfig, model: ContinualModel, scenario: Scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        vit = model.backbone
        self.blocks = _check(cfg, scenario, vit)
        self.per_task, self.task_aware_predict = False, False  # one pool for the stream, no task id at test
        self.heads = vit.blocks[self.blocks[0]].attn.num_heads
        add_prefix_attention(vit, self.blocks)
        self.chunk = cfg.pool_size // scenario.n_tasks  # c rows per task (the original floors too)
        n, M, L, D = len(self.blocks), cfg.pool_size, cfg.prompt_length, vit.embed_dim
        device = next(vit.parameters()).device
        for name, shape in zip(POOL, ((n, M, L, D), (n, M, vit.num_features), (n, M, vit.num_features)), strict=True):
            model.register_parameter(name, nn.Parameter(torch.zeros(shape, device=device)))
        self.init_rows(0)
        self.query = QueryService(frozen_cls(vit))  # q(x): the same backbone, no prefix set

    # ---- components -----------------------------------------------------------------------------------------------
    def rows(self, t: int) -> tuple[int, int]:
        """[s, f): the component rows task ``t`` owns."""
        return t * self.chunk, (t + 1) * self.chunk

    def pool(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self.model, name) for name in POOL}

    @torch.no_grad()
    def init_rows(self, t: int) -> None:
        """Task ``t``'s rows of P (flattened), K and A of every block: Gram-Schmidt against the rows before them;
        the rows after them zero (§4.3). Deterministic given the run's seed and ``t``."""
        s, f = self.rows(t)
        generator = torch.Generator().manual_seed((torch.initial_seed() + INIT_SEED + t) % 2**63)
        for p in self.pool().values():
            if p.is_meta:  # a model built without memory (``retain inspect``)
                continue
            for layer in p:
                layer.copy_(gram_schmidt(layer.flatten(1), s, f, generator).view_as(layer))

    def owned(self, t: int) -> list[str]:
        """Every task trains the pool (only its own rows move) and its head."""
        return list(POOL)

    def active(self, s: int, f: int) -> list[torch.Tensor]:
        """(P, K, A) rows [0, f) with rows [0, s) detached: gradients reach only rows [s, f)."""
        return [torch.cat([p[:, :s].detach(), p[:, s:f]], dim=1) for p in self.pool().values()]

    def prefixes(self, q: torch.Tensor, s: int, f: int) -> dict[int, Prefix]:
        """{block: (p_k, p_v)} for queries q (B, D) from rows [0, f) (those before s detached), in float32."""
        with torch.autocast(q.device.type, enabled=False):
            p, k, a = self.active(s, f)  # (n, f, L, D), (n, f, D), (n, f, D)
            prompts = assemble(component_weights(q.float(), k, a), p)  # (n, B, L, D)
        return {b: split_prefix(prompts[i], self.heads) for i, b in enumerate(self.blocks)}

    @contextmanager
    def prompted(self, x: torch.Tensor, s: int, f: int, cache: bool) -> Iterator[None]:
        """The model with the prefixes of x's queries (one query pass per batch) for a ``with`` block; with no
        active rows (f = 0), the plain model."""
        by_block = self.prefixes(self.query(x, cache), s, f) if f > 0 else {}  # query (B, D)
        with prefixes(self.model.backbone, by_block):
            yield

    def deployed_rows(self) -> int:
        """f of the latest task; 0 before the first task (the pre-trained model)."""
        return self.rows(self.task.index)[1] if self.task is not None else 0

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.init_rows(task.index)

    def stages(self, task: Task) -> list[Stage]:
        params, train = self.trainable_prefixes(task), self.train_cfg
        return [Stage("train", train.epochs, params, weight_decay=0.0, steps=train.steps)]  # wd would move old rows

    def loss(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        """CE over the task's classes with the prompted model; + μ · the orthogonality penalty when μ > 0."""
        x, y = batch
        s, f = self.rows(self.task.index)
        with self.prompted(x, s, f, cache=False):  # augmented images: a fresh query per batch
            logits = self.mask_logits(self.model(x), y)  # (B, C)
        terms = {"ce": self.ce(logits, y)}
        if self.cfg.ortho_weight > 0:
            p, k, a = self.active(s, f)  # (n, f, L, D), (n, f, D), (n, f, D)
            penalty = ortho_penalty(k) + ortho_penalty(a) + ortho_penalty(p.flatten(2))
            terms["ortho"] = self.cfg.ortho_weight * penalty
        return terms

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits over the seen classes with every seen task's components; no task id is used or predicted."""
        f = self.deployed_rows()
        with self.prompted(x, f, f, cache=self.cfg.cache_queries):
            return Prediction(self.model(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) CLS features with the prefixes, as deployed: what the retention k-NN probes."""
        f = self.deployed_rows()
        with self.prompted(x, f, f, cache=self.cfg.cache_queries):
            return self.model.features(x)

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self.query.clear()

    def task_state(self, task: Task) -> dict[str, torch.Tensor]:
        """The task's head and (in a stream) its rows [s, f) of P, K and A in every block."""
        state = super().task_state(task)
        if storage_rule(self.scenario.protocol) == "stream":
            s, f = self.rows(task.index)
            state |= {name: p[:, s:f] for name, p in self.pool().items()}
        return state


def _check(cfg: CODAPromptConfig, scenario: Scenario, vit: nn.Module) -> list[int]:
    """The prompted blocks; ConfigError on a value the method cannot run with."""
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"coda_prompt prefixes a timm VisionTransformer's attention; got {type(vit).__name__}")
    if cfg.pool_size < scenario.n_tasks:
        raise ConfigError(f"method.pool_size={cfg.pool_size}; at least one component per task ({scenario.n_tasks})")
    if cfg.prompt_length < 2 or cfg.prompt_length % 2:
        raise ConfigError(f"method.prompt_length={cfg.prompt_length}; must be even >= 2 (halves: key, value prefix)")
    if not cfg.ortho_weight >= 0:
        raise ConfigError(f"method.ortho_weight={cfg.ortho_weight}; must be >= 0")
    depth = len(vit.blocks)
    blocks = list(range(min(DEFAULT_BLOCKS, depth))) if cfg.blocks is None else list(cfg.blocks)
    if not blocks or len(set(blocks)) != len(blocks) or not all(0 <= b < depth for b in blocks):
        raise ConfigError(f"method.blocks={cfg.blocks}; distinct block indices in 0..{depth - 1}")
    return blocks
