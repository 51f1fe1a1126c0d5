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
import math
import mmap
import os
import secrets
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from retain import distributed
from retain.config import ConfigError
from retain.data.scenarios import Scenario, Task
from retain.methods.base import Batch, ContinualModel, MethodConfig, Stage, register_method
from retain.methods.per_task import PerTaskMethod
from retain.models.adapters import expand_blocks

__all__ = ["BlockExpansionConfig", "BlockExpansion", "TaskBlock", "deterministic_train"]

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHM_DIR = "/dev/shm"  # node-local shared memory: where one process group on one node shares its prefix cache
HEADROOM = 2**30  # bytes the shared prefix cache leaves free where it goes (NCCL and DataLoader workers use /dev/shm)


@dataclass
class BlockExpansionConfig(MethodConfig):
    name: str = "block_expansion"
    train_mask: str = "current"  # class-IL (shared weights): CE over the current task's classes, its head only
    split: int | None = None  # M: a copy after every M-th block, p = N // M new blocks; None: M = N (one, on top)
    per_task: bool | None = None  # own new blocks per task, by task id; None: yes in task_il/finetune, no in class_il
    cache_prefix: bool | None = None  # train on cached frozen-prefix tokens; None: when exact and under cache_max_gb
    cache_max_gb: float = 2.0  # largest prefix cache (a task's training tokens): auto mode skips, true refuses above
    cache_dtype: str = "float32"  # float32 (exact) or bfloat16 (half the memory, tokens rounded; docs/peft_vit.md)


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


def deterministic_train(task: Task) -> bool | None:
    """Whether ``task.train`` and ``task.train_eval`` use the same transform (None: cannot tell)."""
    train, ref = getattr(task.train, "base", None), getattr(task.train_eval, "base", None)
    tf_train, tf_ref = getattr(train, "transform", None), getattr(ref, "transform", None)
    if train is None or ref is None:
        return None
    return repr(tf_train) == repr(tf_ref)


@register_method
class BlockExpansion(PerTaskMethod):
    """Identity-initialised blocks inserted into a frozen timm ViT; see the module docstring."""

    config_class = BlockExpansionConfig

    def __init__(self, cfg: BlockExpansionConfig, model: ContinualModel, scenario: Scenario, train_cfg) -> None:
        super().__init__(cfg, model, scenario, train_cfg)
        vit = model.backbone
        if not isinstance(getattr(vit, "blocks", None), nn.Sequential | nn.ModuleList):
            raise ConfigError(f"block_expansion needs a timm ViT backbone (blocks), got {type(vit).__name__}")
        if cfg.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"method.cache_dtype={cfg.cache_dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")
        self.split = len(vit.blocks) if cfg.split is None else cfg.split
        try:
            self.new_blocks = expand_blocks(vit, self.split)  # indices in the expanded ViT
        except ValueError as e:
            raise ConfigError(f"method.split={cfg.split}: {e}") from None
        if self.per_task:
            for i in self.new_blocks:
                vit.blocks[i] = TaskBlock(vit.blocks[i], scenario.n_tasks)
        self.prefix_cached: list[int] = []  # tasks trained on cached prefix tokens (tests, benchmarks)

    def owned(self, t: int) -> list[str]:
        """Name prefixes of the new blocks task ``t`` trains (its own copies, or the shared ones)."""
        own = f".tasks.{t}." if self.per_task else "."
        return [f"backbone.blocks.{i}{own}" for i in self.new_blocks]

    def stages(self, task: Task) -> list[Stage]:
        cached = self.use_prefix_cache(task)
        data = (lambda: self.prefix_dataset(task)) if cached else None
        return [Stage("train", self.train_cfg.epochs, self.trainable_prefixes(task), steps=self.train_cfg.steps,
                      data=data, loss=self.cached_prefix_loss if cached else None)]  # fmt: skip

    def cached_prefix_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The training CE from cached frozen-prefix tokens (the stage's loss when ``use_prefix_cache``)."""
        tokens, y = batch  # (B, L, D) frozen-prefix output, (B,)
        tokens = tokens.float()  # a bfloat16 cache computes in float32 from here (no-op for float32)
        logits = self.mask_logits(self.model.head(self.suffix_features(tokens)), y)  # (B, C)
        return {"ce": self.ce(logits, y)}

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
        fits = self.prefix_cache_bytes(task) <= self.cfg.cache_max_gb * 2**30
        if self.cfg.cache_prefix:
            if not exact:
                raise ConfigError("method.cache_prefix=true needs a deterministic training transform "
                                  "(data.augment=none) and no dropout below the first new block")  # fmt: skip
            if not fits:
                raise ConfigError(f"method.cache_prefix=true: task {task.index}'s prefix cache is "
                                  f"{self.prefix_cache_bytes(task) / 2**30:.2f} GB ({self.cfg.cache_dtype}), over "
                                  f"method.cache_max_gb={self.cfg.cache_max_gb:g}; raise method.cache_max_gb or set "
                                  "method.cache_prefix=false (or null: cache only when it fits)")  # fmt: skip
            return True
        return exact and fits

    def prefix_cache_bytes(self, task: Task) -> int:
        """Size of ``task``'s prefix cache: (N, L, D) tokens of its training images in ``cache_dtype``."""
        return len(task.train) * math.prod(self._token_shape()) * CACHE_DTYPES[self.cfg.cache_dtype].itemsize

    def _token_shape(self) -> tuple[int, int]:
        """(L, D) of one image's prefix tokens."""
        vit = self.model.backbone
        return vit.patch_embed.num_patches + vit.num_prefix_tokens, vit.embed_dim

    def _prefix_modules(self) -> list[nn.Module]:
        vit = self.model.backbone
        return [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre, *vit.blocks[: self.first_trainable]]

    def prefix_dataset(self, task: Task) -> Dataset:
        """(tokens (N, L, D) in ``cache_dtype``, labels) of the task's training images (deterministic transform),
        computed once, written batch by batch into one preallocated tensor (no list of batches to concatenate). Each
        process computes its shard; on one node they write it into one shared file mapping (one copy per node, see
        :class:`_SharedRows`), else the shards are gathered (a copy per process)."""
        self.prefix_cached.append(task.index)
        was_training = self.model.training
        self.model.eval()
        loader = self.loader(task.train_eval)
        rows = getattr(loader.batch_sampler, "indices", None)  # this process's rows (not iterated: no RNG draw)
        n = len(rows) if rows is not None else len(loader.dataset)
        dtype = CACHE_DTYPES[self.cfg.cache_dtype]
        shared = _SharedRows.open(n, self._token_shape(), dtype) if distributed.one_node() else None
        tokens = shared.rows if shared is not None else None  # (N_r, L, D): its rows of the shared cache
        labels = None
        lo = 0
        with torch.no_grad():
            for x, y in loader:
                t = self.prefix_tokens(x.to(self.device))  # (B, L, D)
                if tokens is None:
                    tokens = torch.empty((n, *t.shape[1:]), dtype=dtype)  # (N_r, L, D)
                if labels is None:
                    labels = torch.empty(n, dtype=y.dtype)  # (N_r,)
                tokens[lo : lo + len(y)] = t.float().cpu()  # float32 first: the same values as the feature cache's
                labels[lo : lo + len(y)] = y
                lo += len(y)
        self.model.train(was_training)
        labels = distributed.gather_rows(labels)  # (N,)
        tokens = shared.finish() if shared is not None else distributed.gather_rows(tokens)  # (N, L, D)
        return TensorDataset(tokens, labels)

    # ---- checkpoint ------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Heads and the new blocks trained so far (untrained per-task copies are rebuilt from the backbone)."""
        upto = self.task.index if self.task is not None else 0
        keep = tuple(p for t in range(upto + 1) for p in self.owned(t)) + ("head.",)
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(keep)}


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


def _free_bytes(directory: str) -> int:
    """Bytes a process may still write under ``directory`` (0 when it is missing)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _reserve(path: str, nbytes: int) -> bool:
    """Create ``path`` (new, owner-only) with ``nbytes`` allocated: a full device is this False, never a SIGBUS while
    a process writes its rows later."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
        else:  # macOS: a sparse file (a full device would then fail at a write)
            os.ftruncate(fd, nbytes)
        return True
    except OSError:
        os.unlink(path)
        return False
    finally:
        os.close(fd)


def _create_cache_file(nbytes: int) -> str:
    """Rank 0: a new ``nbytes`` file named uniquely (pid and a random token) in ``SHM_DIR`` when it has room (and
    ``HEADROOM`` besides), else in the temporary directory (one warning); "" when neither has (one warning): every
    process gathers a copy."""
    name = f"retain-prefix-cache-{os.getpid()}-{secrets.token_hex(8)}.bin"
    tmp = tempfile.gettempdir()
    for directory in dict.fromkeys((SHM_DIR, tmp)):
        path = os.path.join(directory, name)
        if _free_bytes(directory) >= nbytes + HEADROOM and _reserve(path, nbytes):
            if directory != SHM_DIR:
                warnings.warn(f"prefix cache: no room for {nbytes / 2**30:.2f} GB in {SHM_DIR}; the processes share "
                              f"it through {tmp} instead", stacklevel=3)  # fmt: skip
            return path
    warnings.warn(f"prefix cache: no room for {nbytes / 2**30:.2f} GB in {SHM_DIR} or {tmp}; every process "
                  "holds its own copy", stacklevel=3)  # fmt: skip
    return ""


class _SharedRows:
    """A prefix cache (N, L, D) in one node-local file that every process of a one-node group maps: each writes its
    shard's rows (at the sum of the lower ranks' row counts, where ``gather_rows`` would put them), then maps the
    whole of it copy-on-write. The node holds one copy, not one per process; the file is unlinked as soon as every
    process has it open (the mappings keep its memory until the last one goes)."""

    def __init__(self, path: str, counts: list[int], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.shape, self.dtype = (sum(counts), *shape), dtype
        self.nbytes = math.prod(self.shape) * dtype.itemsize
        whole = torch.frombuffer(mmap.mmap(self.fd, self.nbytes), dtype=dtype).view(self.shape)  # (N, L, D) shared
        lo = sum(counts[: distributed.rank()])
        self.rows = whole[lo : lo + counts[distributed.rank()]]  # (N_r, L, D): this process's rows, written in place

    @classmethod
    def open(cls, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> _SharedRows | None:
        """Collective: the shared cache of every process's ``n`` rows of ``shape``; None (on every process) when
        rank 0 finds no room for it, a process cannot open rank 0's file, or it would be empty."""
        counts = distributed.gather_counts(n)
        nbytes = sum(counts) * math.prod(shape) * dtype.itemsize
        path = distributed.broadcast_text(_create_cache_file(nbytes) if distributed.is_main() and nbytes else "")
        if not path:
            return None
        try:
            shared = cls(path, counts, shape, dtype)
        except OSError:  # e.g. a process whose /dev/shm is not rank 0's (another container)
            shared = None
        try:
            opened = int(distributed.all_reduce_sum(torch.tensor([shared is not None], dtype=torch.int64)))
        finally:
            if distributed.is_main():
                os.unlink(path)  # every process has it open (or gives up)
        if opened == distributed.world_size():
            return shared
        if shared is not None:
            os.close(shared.fd)
        if distributed.is_main():
            warnings.warn(f"prefix cache: not every process could open {path}; every process holds its own copy",
                          stacklevel=3)  # fmt: skip
        return None

    def finish(self) -> torch.Tensor:
        """Collective, once this process's rows are written: (N, L, D), every process's rows, mapped copy-on-write
        (the pages stay the node's one copy unless this process writes to them)."""
        self.rows = None  # the writable mapping goes with the caller's last reference to its rows
        distributed.barrier()  # every process's rows are written
        buf = mmap.mmap(self.fd, self.nbytes, access=mmap.ACCESS_COPY)
        os.close(self.fd)
        return torch.frombuffer(buf, dtype=self.dtype).view(self.shape)  # (N, L, D)
