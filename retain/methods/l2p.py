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

``form: prefix`` is CODA's re-implementation "L2P++" (GT-RIPL/CODA-Prompt ``models/zoo.py``, class ``L2P``; PROMPTS.md
§4.6): the selected prompts are prefix-tuning of chosen blocks instead of tokens. Each block in ``blocks`` has its own
pool (M, L_p, D) and keys (M, D) and selects on its own (block 0 alone: L2P++; blocks 0-4: "Deep L2P++"); each of the
N selected prompts gives its first L_p/2 rows to the attention's key prefix and its last L_p/2 rows to the value
prefix (N L_p/2 rows each), and the head reads CLS. ``key_reduction`` chooses the key loss: ``mean`` (L2P), ``sum``
(CODA's Σ_b Σ_i (1 - cos) over each sample's own keys) or ``coda_bxb`` (CODA's code as released: every query against
every sample's selected keys, a B x B x N sum, PROMPTS.md §8.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from retain import distributed
from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import Batch, ContinualModel, MethodConfig, Prediction, Stage, register_method
from retain.methods.per_task import PerTaskMethod
from retain.models.prompting import Prefix, add_prefix_attention, prefixes, prompt_token_mean, prompted_features
from retain.models.query import QueryService, frozen_cls

__all__ = ["L2PConfig", "L2P", "l2_normalize", "prompt_similarity", "batch_vote", "select_prompts", "key_loss"]

PROMPT_INITS = ("uniform", "uniform_small", "uniform_unit")
PROMPT_POS = ("cls", "none")
HEAD_INPUTS = ("prompt", "cls")
FORMS = ("prompt", "prefix")
KEY_REDUCTIONS = ("mean", "sum", "coda_bxb")
# L2P-pt U(-1, 1); JAX Flax uniform() U[0, 0.01); CODA nn.init.uniform_ U[0, 1) (models/zoo.py tensor_prompt)
INIT_RANGE = {"uniform": (-1.0, 1.0), "uniform_small": (0.0, 0.01), "uniform_unit": (0.0, 1.0)}
EPS = 1e-12  # on the squared norm (L2P-pt's l2_normalize)
PREFIX_BLOCKER = "prefixes set per batch inside the backbone's attention"
COUNTS = "l2p.selection_counts"  # the current task's selection counts in a checkpoint (not a model tensor)


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
    # | uniform_unit U[0, 1) (CODA's L2P++)
    prompt_pos: str = "cls"  # prompts' position embedding: cls (CLS's copy, L2P-pt) | none (JAX); prompt form only
    head_input: str = "prompt"  # prompt: mean of the prompt tokens' outputs (both repos) | cls: the CLS token
    form: str = "prompt"  # prompt: tokens before block 0 (L2P) | prefix: prefix-tuning of `blocks` (CODA's L2P++)
    blocks: list[int] | None = None  # prefix form: blocks, each with its own pool and keys; None: [0] (L2P++)
    key_reduction: str = "mean"  # mean: -(1/B) Σ_b Σ_i cos (L2P) | sum: Σ_b Σ_i (1 - cos) | coda_bxb: CODA's B x B x N
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


def key_loss(query: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The key (pull) loss of queries (B, D), keys (M, D) and selected ids (B, N), float32; the gradient reaches the
    selected keys only (the query is the frozen model's).

    ``mean``: ``-(1/B) sum_b sum_i cos(query_b, keys[idx_bi])`` (L2P). ``sum``: ``sum_b sum_i (1 - cos(query_b,
    keys[idx_bi]))`` (CODA's reduction, each sample's own keys). ``coda_bxb``: ``sum_{b, b', i} (1 - cos(query_b,
    keys[idx_b'i]))``, CODA's code as released (``cos_sim[:, k_idx]`` pairs every query with every sample's keys).
    """
    if reduction not in KEY_REDUCTIONS:
        raise ValueError(f"key_loss: reduction must be one of {', '.join(KEY_REDUCTIONS)}, got {reduction!r}")
    with torch.autocast(query.device.type, enabled=False):
        q = l2_normalize(query.detach().float())  # (B, D)
        if reduction == "coda_bxb":
            return (1.0 - (q @ l2_normalize(keys.float()).T)[:, idx]).sum()  # (B, M) -> (B, B, N)
        k = l2_normalize(keys.float())[idx]  # (B, N, D)
        if reduction == "sum":
            return (1.0 - (k * q.unsqueeze(1)).sum(-1)).sum()
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
        vit, (M, L) = model.backbone, (cfg.pool_size, cfg.prompt_length)
        self.blocks = _check(cfg, vit)  # prefix form: the prompted blocks; prompt form: []
        self.per_task = self.task_aware_predict = False  # one pool for every task, chosen by key, never by task id
        self.compile_blocker = PREFIX_BLOCKER if cfg.form == "prefix" else L2P.compile_blocker  # not per-task's reason
        device, dim = next(vit.parameters()).device, vit.num_features
        lead: tuple[int, ...] = ()  # prompt form: one pool (M, L_p, D); prefix form: one per block (n, M, L_p, D)
        if cfg.form == "prefix":
            self.heads = add_prefix_attention(vit, self.blocks)[0].base_layer.num_heads
            lead = (len(self.blocks),)
        low, high = INIT_RANGE[cfg.prompt_init]  # the same draw for prompts and keys, as both repos
        prompts = torch.empty(*lead, M, L, dim, device=device).uniform_(low, high)  # ([n,] M, L_p, D)
        keys = torch.empty(*lead, M, dim, device=device).uniform_(low, high)  # ([n,] M, D)
        model.register_parameter("l2p_prompts", nn.Parameter(prompts))
        model.register_parameter("l2p_keys", nn.Parameter(keys))
        self.query = QueryService(frozen_cls(vit))  # the frozen pass: no prompt or prefix ever set for it
        self.counts_shape = (*lead, M)
        self.selection_counts = torch.zeros(self.counts_shape, dtype=torch.long)  # this task's selections (§8.5)

    def owned(self, t: int) -> list[str]:
        """The pool and its keys, shared: every task trains them in turn."""
        return ["l2p_prompts", "l2p_keys"]

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.selection_counts = torch.zeros(self.counts_shape, dtype=torch.long, device=self.device)

    def loss(self, batch: Batch, stage: Stage) -> dict[str, torch.Tensor]:
        """CE over the current task's classes on the prompted features, and λ times the key loss."""
        x, y = batch
        query = self.query(x, cache=False)  # (B, D) float32, augmented images: never cached
        idx = self.choose(query, global_batch=True)  # ([n,] B, N), the vote over the global batch
        self.count(idx)
        logits = self.mask_logits(self.model.head(self.prompted(x, idx)), y)  # (B, C)
        return {"ce": self.ce(logits, y), "key": self.cfg.key_weight * self.key_loss(query, idx)}

    def choose(self, query: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
        """Pool ids of queries (B, D): (B, N) in prompt form, (n, B, N) in prefix form (each block by its own keys)."""
        keys, cfg = self.model.l2p_keys, self.cfg
        if cfg.form == "prompt":
            return select_prompts(prompt_similarity(query, keys), cfg.top_k, cfg.batchwise_prompt, global_batch)
        return torch.stack([select_prompts(prompt_similarity(query, k), cfg.top_k, cfg.batchwise_prompt, global_batch)
                            for k in keys])  # fmt: skip

    def key_loss(self, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The unweighted key loss of the selection ``idx``; in prefix form summed over the blocks (CODA)."""
        keys, reduction = self.model.l2p_keys, self.cfg.key_reduction
        if self.cfg.form == "prompt":
            return key_loss(query, keys, idx) if reduction == "mean" else key_loss(query, keys, idx, reduction)
        return sum(key_loss(query, k, i, reduction) for k, i in zip(keys, idx, strict=True))

    def count(self, idx: torch.Tensor) -> None:
        """Add the selection ``idx`` ([n,] B, N) to this task's histogram (a batch's vote counts once)."""
        votes = idx[..., :1, :] if self.cfg.batchwise_prompt else idx  # ([n,] b, N)
        hist = F.one_hot(votes, self.cfg.pool_size).sum((-3, -2))  # ([n,] M)
        self.selection_counts = self.selection_counts.to(idx.device) + hist

    def task_record(self, task: Task) -> dict[str, Any]:
        """``metrics.json``'s ``method_records``: how often each pool prompt was chosen while training the task (a
        batch's vote counts once; the L2P paper's selection histograms). Per-sample choices are summed over the
        processes; a batch vote is already the same on every process."""
        counts = self.selection_counts.clone()
        if not self.cfg.batchwise_prompt:
            distributed.all_reduce_sum(counts)
        if counts.ndim == 2 and len(counts) == 1:
            counts = counts[0]  # one prefix block: one count per pool prompt, as the prompt form
        return {"prompt_selection_train": counts.tolist()}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The model, and this task's selection counts so far (a run resumed inside a task keeps counting)."""
        return super().checkpoint_state() | {COUNTS: self.selection_counts.detach().clone()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        counts = state.pop(COUNTS, None)
        if counts is not None:
            self.selection_counts = counts.to(self.device, torch.long)
        super().load_checkpoint_state(state)

    def resume(self, last_task: Task) -> None:
        super().resume(last_task)
        self.query.clear()

    # ---- forward --------------------------------------------------------------------------------------------------
    def prompted(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, D) classifier input of images x with the pool prompts ``idx`` (B, N) prepended to the patches; in
        prefix form ``idx`` (n, B, N) and the prompts are the blocks' key / value prefixes, the head reads CLS."""
        vit = self.model.backbone
        if self.cfg.form == "prefix":
            by_block = {b: self.prefix(i, idx[i]) for i, b in enumerate(self.blocks)}
            with prefixes(vit, by_block):
                return self.model.features(x)  # (B, D)
        prompts = self.model.l2p_prompts[idx].flatten(1, 2)  # (B, N * L_p, D)
        tokens = prompted_features(vit, x, prompts, self.cfg.prompt_pos)  # (B, 1 + N * L_p + N_patches, D)
        if self.cfg.head_input == "cls":
            return vit.fc_norm(tokens[:, 0])  # (B, D)
        return vit.fc_norm(prompt_token_mean(tokens, prompts.shape[1], vit.num_prefix_tokens))  # (B, D)

    def prefix(self, i: int, idx: torch.Tensor) -> Prefix:
        """(p_k, p_v), each (B, H, N L_p / 2, d_h), of the i-th prefix block: for each selected prompt ``idx`` (B, N)
        in turn its first L_p / 2 rows are key prefixes and its last L_p / 2 rows value prefixes (CODA's L2P++)."""
        p = self.model.l2p_prompts[i][idx]  # (B, N, L_p, D)
        B, N, L, D = p.shape
        half = p.reshape(B, N, 2, L // 2, self.heads, D // self.heads)  # (B, N, 2, L/2, H, d)
        half = half.permute(2, 0, 4, 1, 3, 5).reshape(2, B, self.heads, N * (L // 2), D // self.heads)
        return half[0], half[1]  # (B, H, N L/2, d) each

    @torch.no_grad()
    def select(self, x: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """([n,] B, N) pool ids of images x as at test: the frozen model's queries, top-N, the vote if
        ``batchwise``."""
        return self.choose(self.query(x, cache))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None = None) -> Prediction:
        """Logits over all seen classes with the selected prompts; no task id (L2P selects prompts, not tasks)."""
        feats = self.prompted(x, self.select(x, self.cfg.cache_queries))  # (B, D)
        return Prediction(self.model.head(feats))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) the prompted classifier input with the test-time selection: what the retention k-NN probes."""
        return self.prompted(x, self.select(x, cache=False))


def _check(cfg: L2PConfig, vit: nn.Module) -> list[int]:
    """The prefix blocks ([] in prompt form); ConfigError on a value the method cannot run with."""
    for key, value, valid in (("prompt_init", cfg.prompt_init, PROMPT_INITS),
                              ("prompt_pos", cfg.prompt_pos, PROMPT_POS),
                              ("head_input", cfg.head_input, HEAD_INPUTS),
                              ("form", cfg.form, FORMS),
                              ("key_reduction", cfg.key_reduction, KEY_REDUCTIONS)):  # fmt: skip
        if value not in valid:
            raise ConfigError(f"method.{key}={value!r}; valid: {', '.join(valid)}")
    for key in ("pool_size", "prompt_length", "top_k"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"method.{key}={getattr(cfg, key)}; it must be >= 1")
    if cfg.top_k > cfg.pool_size:
        raise ConfigError(f"method.top_k={cfg.top_k} exceeds method.pool_size={cfg.pool_size}")
    if cfg.key_weight < 0:
        raise ConfigError(f"method.key_weight={cfg.key_weight}; it must be >= 0")
    if cfg.form == "prompt":
        if cfg.blocks is not None:
            raise ConfigError(f"method.blocks={cfg.blocks}; only with method.form=prefix (prompts: before block 0)")
        return []
    if cfg.head_input != "cls":
        raise ConfigError(f"method.head_input={cfg.head_input!r}; method.form=prefix adds no tokens: use cls")
    if cfg.prompt_length < 2 or cfg.prompt_length % 2:
        raise ConfigError(f"method.prompt_length={cfg.prompt_length}; method.form=prefix needs it even >= 2 "
                          "(halves: key, value prefix)")  # fmt: skip
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"method.form=prefix needs a timm VisionTransformer, not {type(vit).__name__}")
    depth = len(vit.blocks)
    blocks = [0] if cfg.blocks is None else list(cfg.blocks)
    valid = all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < depth for b in blocks)
    if not blocks or len(set(blocks)) != len(blocks) or not valid:
        raise ConfigError(f"method.blocks={cfg.blocks}; distinct block indices in 0..{depth - 1}")
    return blocks
