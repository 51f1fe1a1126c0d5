"""Learning to Prompt (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022), as the official JAX
code (google-research/l2p) and its PyTorch port (JH-LEE-KR/l2p-pytorch, "L2P-pt") run it (PROMPTS.md §2).

Trained: a pool of M prompts (M, L_p, D), their keys (M, D) and the head; all shared by the stream (no per-task
ownership, nothing frozen between tasks). Frozen: the whole ViT. Each batch, the frozen ViT's CLS (the query) picks
the N prompts whose keys are most cosine-similar (per sample, then a batch-wise majority vote); they are prepended
to the patch tokens ([CLS, prompts, patches]) and the head reads the mean of the prompt tokens' outputs. Loss: CE
over the current task's classes, plus λ times the key loss that pulls the selected keys towards the queries.

The query is the same backbone run without prompts (exact: the backbone is frozen), once per batch, shared by the
selection and the key loss; test-time queries are cached per image (``cache_queries``). Selection, similarities and
the key loss are float32 whatever the run's autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retain import distributed
from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import Batch, ContinualModel, MethodConfig, Prediction, Stage, register_method
from retain.methods.per_task import PerTaskMethod
from retain.models.prompting import prompt_token_mean, prompted_features
from retain.models.query import QueryService, frozen_cls

__all__ = ["L2PConfig", "L2P", "l2_normalize", "prompt_similarity", "batch_vote", "select_prompts", "key_loss"]

PROMPT_INITS = ("uniform", "uniform_small")
PROMPT_POS = ("cls", "none")
HEAD_INPUTS = ("prompt", "cls")
INIT_RANGE = {"uniform": (-1.0, 1.0), "uniform_small": (0.0, 0.01)}  # L2P-pt U(-1, 1); JAX Flax uniform() U[0, 0.01)
EPS = 1e-12  # on the squared norm (L2P-pt's l2_normalize)


@dataclass
class L2PConfig(MethodConfig):
    """Defaults: L2P-pt's Split CIFAR-100 config (PROMPTS.md §2.1); the JAX config is M10, L_p 10, N 4, λ 1.0,
    ``prompt_init=uniform_small``, ``prompt_pos=none``."""

    name: str = "l2p"
    train_mask: str = "current"  # CE over the current task's classes (both repos' train_mask)
    pool_size: int = 10  # M, prompts in the pool
    prompt_length: int = 5  # L_p, tokens per prompt
    top_k: int = 5  # N, prompts selected per image
    key_weight: float = 0.1  # λ, weight of the key (pull) loss
    batchwise_prompt: bool = True  # majority vote over the batch, at training and test (paper protocol)
    prompt_init: str = "uniform"  # prompts and keys: uniform U(-1, 1) (L2P-pt) | uniform_small U[0, 0.01) (JAX)
    prompt_pos: str = "cls"  # position embedding of prompts: cls (copy of CLS's, L2P-pt) | none (JAX)
    head_input: str = "prompt"  # prompt: mean of the prompt tokens' outputs (both repos) | cls: the CLS token
    cache_queries: bool = True  # test-time queries cached per image (deterministic transform); never at training


# ---- selection (pure functions) ------------------------------------------------------------------------------------
def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(max(||x||^2, 1e-12))`` along the last axis (L2P-pt's eps is on the squared norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp_min(EPS))


def prompt_similarity(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, M) cosine similarities of queries (B, D) and keys (M, D), in float32 with autocast off."""
    with torch.autocast(query.device.type, enabled=False):
        return l2_normalize(query.float()) @ l2_normalize(keys.float()).T  # (B, M)


def batch_vote(idx: torch.Tensor, pool_size: int, global_batch: bool = False) -> torch.Tensor:
    """(B, N) the N ids most often among all per-sample selections ``idx`` (B, N), the same for every sample.

    As the official code: the ids present are counted; when fewer than ``pool_size`` are present the list is padded
    with ``min(idx)`` at count 0, so padding wins only where fewer than N distinct ids exist. Ties in count go to the
    smaller id (a stable sort; the official ``topk`` leaves them to the kernel). ``global_batch``: under several
    processes the counts are summed over them (a collective: training steps, which every process takes together),
    so each slice votes as the one-process batch does.
    """
    B, N = idx.shape
    counts = torch.bincount(idx.flatten(), minlength=pool_size)  # (M,)
    if global_batch and distributed.active():
        counts = distributed.all_reduce_sum(counts)
    ids = counts.nonzero().flatten()  # (U,) the ids present, ascending
    counts = counts[ids]  # (U,)
    if len(ids) < pool_size:
        pad = pool_size - len(ids)
        ids = torch.cat([ids, ids.min().expand(pad)])  # (M,)
        counts = torch.cat([counts, counts.new_zeros(pad)])  # (M,)
    order = torch.sort(counts, descending=True, stable=True).indices[:N]  # (N,)
    return ids[order].unsqueeze(0).expand(B, N)  # (B, N)


def select_prompts(sim: torch.Tensor, top_k: int, batchwise: bool = True, global_batch: bool = False) -> torch.Tensor:
    """(B, N) pool ids from similarities (B, M): per-sample top-N, then (``batchwise``) the batch's majority vote
    (``global_batch``: over every process's slice, see :func:`batch_vote`)."""
    idx = sim.topk(top_k, dim=1).indices  # (B, N)
    return batch_vote(idx, sim.shape[1], global_batch) if batchwise else idx


def key_loss(query: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``-(1/B) sum_b sum_i cos(query_b, keys[idx_bi])``: queries (B, D), keys (M, D), selected ids (B, N); float32,
    the gradient reaches the selected keys only (the query is the frozen model's)."""
    with torch.autocast(query.device.type, enabled=False):
        q = l2_normalize(query.detach().float())  # (B, D)
        k = l2_normalize(keys.float())[idx]  # (B, N, D)
        return -(k * q.unsqueeze(1)).sum((1, 2)).mean()


# ---- the method ----------------------------------------------------------------------------------------------------
@register_method
class L2P(PerTaskMethod):
    """A shared prompt pool selected by key; see the module docstring. A per-task-family method whose weights are
    always shared by the stream (``per_task`` False in every protocol): tasks own only their heads."""

    config_class = L2PConfig
    compile_blocker = "the prompted pass runs the ViT's pieces by hand (retain.models.prompting.prompted_features)"

    def __init__(self, cfg: L2PConfig, model: ContinualModel, scenario: Scenario, train_cfg: Any) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        _check(cfg)
        self.per_task = self.task_aware_predict = False  # one pool for every task, chosen by key, never by task id
        self.compile_blocker = L2P.compile_blocker  # not the per-task reason the base gives in task-IL
        vit, (M, L) = model.backbone, (cfg.pool_size, cfg.prompt_length)
        device, dim = next(vit.parameters()).device, vit.num_features
        low, high = INIT_RANGE[cfg.prompt_init]  # the same draw for prompts and keys, as both repos
        prompts = torch.empty(M, L, dim, device=device).uniform_(low, high)  # (M, L_p, D)
        keys = torch.empty(M, dim, device=device).uniform_(low, high)  # (M, D)
        model.register_parameter("l2p_prompts", nn.Parameter(prompts))
        model.register_parameter("l2p_keys", nn.Parameter(keys))
        self.query = QueryService(frozen_cls(vit))  # the frozen pass: no prompt ever enters forward_features
        self.selection_counts = torch.zeros(M, dtype=torch.long)  # this task's training selections (§8.5)
        self.selection_history: list[list[int]] = []  # per finished task

    def owned(self, t: int) -> list[str]:
        """The pool and its keys, shared: every task trains them in turn."""
        return ["l2p_prompts", "l2p_keys"]

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.selection_counts = torch.zeros(self.cfg.pool_size, dtype=torch.long, device=self.device)

    def loss(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        """CE over the current task's classes on the prompted features, and λ times the key loss."""
        x, y = batch
        query = self.query(x, cache=False)  # (B, D) float32, augmented images: never cached
        sim = prompt_similarity(query, self.model.l2p_keys)  # (B, M)
        idx = select_prompts(sim, self.cfg.top_k, self.cfg.batchwise_prompt, global_batch=True)  # the global batch
        self.count(idx)
        logits = self.mask_logits(self.model.head(self.prompted(x, idx)), y)  # (B, C)
        return {"ce": self.ce(logits, y), "key": self.cfg.key_weight * key_loss(query, self.model.l2p_keys, idx)}

    def count(self, idx: torch.Tensor) -> None:
        """Add the selection ``idx`` (B, N) to this task's histogram (a batch's vote counts once), on the device."""
        votes = idx[:1] if self.cfg.batchwise_prompt else idx  # (b, N)
        self.selection_counts = self.selection_counts.to(idx.device) + F.one_hot(votes, self.cfg.pool_size).sum((0, 1))

    def after_task(self, task: Task) -> None:
        self.selection_history.append(self.selection_counts.tolist())

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self.query.clear()

    # ---- forward --------------------------------------------------------------------------------------------------
    def prompted(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, D) classifier input of images x with the pool prompts ``idx`` (B, N) prepended to the patches."""
        vit = self.model.backbone
        prompts = self.model.l2p_prompts[idx].flatten(1, 2)  # (B, N * L_p, D)
        tokens = prompted_features(vit, x, prompts, self.cfg.prompt_pos)  # (B, 1 + N * L_p + N_patches, D)
        if self.cfg.head_input == "cls":
            return vit.fc_norm(tokens[:, 0])  # (B, D)
        return vit.fc_norm(prompt_token_mean(tokens, prompts.shape[1], vit.num_prefix_tokens))  # (B, D)

    @torch.no_grad()
    def select(self, x: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """(B, N) pool ids of images x as at test: the frozen model's queries, top-N, the vote if ``batchwise``."""
        sim = prompt_similarity(self.query(x, cache), self.model.l2p_keys)  # (B, M)
        return select_prompts(sim, self.cfg.top_k, self.cfg.batchwise_prompt)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits over all seen classes with the selected prompts; no task id (L2P selects prompts, not tasks)."""
        feats = self.prompted(x, self.select(x, self.cfg.cache_queries))  # (B, D)
        return Prediction(self.model.head(feats))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) the prompted classifier input with the test-time selection: what the retention k-NN probes."""
        return self.prompted(x, self.select(x, cache=False))


def _check(cfg: L2PConfig) -> None:
    for key, value, valid in (("prompt_init", cfg.prompt_init, PROMPT_INITS),
                              ("prompt_pos", cfg.prompt_pos, PROMPT_POS),
                              ("head_input", cfg.head_input, HEAD_INPUTS)):  # fmt: skip
        if value not in valid:
            raise ConfigError(f"method.{key}={value!r}; valid: {', '.join(valid)}")
    for key in ("pool_size", "prompt_length", "top_k"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"method.{key}={getattr(cfg, key)}; it must be >= 1")
    if cfg.top_k > cfg.pool_size:
        raise ConfigError(f"method.top_k={cfg.top_k} exceeds method.pool_size={cfg.pool_size}")
    if cfg.key_weight < 0:
        raise ConfigError(f"method.key_weight={cfg.key_weight}; it must be >= 0")
