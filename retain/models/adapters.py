"""Model surgery shared by continual-learning methods, applied to a model before it moves to its device.

- Parameter selection by pattern: ``matches``, ``trainable_names``, ``mark_trainable`` (globs such as ``*lora_*``
  or prefixes such as ``backbone.`` / ``head.heads.3.``).
- Module replacement by regex over qualified names: ``replace_modules``.
- Per-task switching of every submodule with a ``set_task`` method: ``set_task``, ``use_task``.
- Block Expansion (Bafghi et al., "Parameter Efficient Fine-tuning of Self-supervised ViTs without Catastrophic
  Forgetting", CVPRW 2024): ``expand_blocks`` inserts identity-initialised copies of timm ViT blocks.
- q/k/v split of timm's fused attention projection, so adapters (e.g. peft's LoRA) can target ``q`` and ``v`` by
  name: ``split_qkv`` / ``merge_qkv`` and the ``QKV`` module.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = ["matches", "trainable_names", "mark_trainable", "replace_modules", "set_task", "use_task",
           "expand_blocks", "QKV", "split_qkv", "merge_qkv"]  # fmt: skip

GLOB_CHARS = frozenset("*?[")


# ---- parameter selection -------------------------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """A pattern with any of ``*?[`` is a glob over the whole name (``fnmatchcase``), otherwise a name prefix."""
    if GLOB_CHARS.intersection(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name.startswith(pattern)


def _patterns(patterns: str | Iterable[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def trainable_names(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Names of the parameters matching any of ``patterns``, in ``named_parameters()`` order."""
    patterns = _patterns(patterns)
    return [n for n, _ in model.named_parameters() if any(matches(n, p) for p in patterns)]


def mark_trainable(model: nn.Module, patterns: str | Iterable[str]) -> int:
    """Set ``requires_grad`` on exactly the parameters matching ``patterns``; returns the trainable element count."""
    selected = set(trainable_names(model, patterns))
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in selected)
        n += p.numel() if p.requires_grad else 0
    return n


# ---- module replacement --------------------------------------------------------------------------------------------
def _replace(model: nn.Module, names: list[str], factory: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace each named submodule in its parent by ``factory(name, module)``, skipping any inside a replaced one."""
    done: list[str] = []
    for name in names:
        if any(name.startswith(f"{outer}.") for outer in done):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, factory(name, getattr(parent, child)))
        done.append(name)
    return done


def replace_modules(model: nn.Module, pattern: str, factory: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule whose qualified name fully matches the regex ``pattern`` by ``factory(name, module)``.

    Names are collected before any replacement (so the new modules are not visited); where both a module and one of
    its descendants match, the outermost wins. The root module is never replaced. Returns the replaced names.

    Raises:
        ValueError: nothing matched ``pattern``.
    """
    names = [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)]
    if not names:
        raise ValueError(f"replace_modules: no submodule name fully matches {pattern!r}")
    return _replace(model, names, factory)


# ---- per-task switching --------------------------------------------------------------------------------------------
def _switchable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if m is not model and callable(getattr(m, "set_task", None))]


def set_task(model: nn.Module, task: Any) -> int:
    """Call ``set_task(task)`` on every submodule (not ``model`` itself) that has one; returns how many."""
    modules = _switchable(model)
    for m in modules:
        m.set_task(task)
    return len(modules)


@contextmanager
def use_task(model: nn.Module, task: Any) -> Iterator[int]:
    """``set_task(model, task)`` for the duration of a ``with`` block (yields the count), then restore.

    Rule: a switched module that exposes a ``task`` attribute is restored on exit by ``set_task(previous task)``
    (even if the block raised); one without a ``task`` attribute cannot be restored and keeps ``task``.
    """
    modules = _switchable(model)
    before = [(m, m.task) for m in modules if hasattr(m, "task")]
    for m in modules:
        m.set_task(task)
    try:
        yield len(modules)
    finally:
        for m, previous in before:
            m.set_task(previous)


# ---- Block Expansion -----------------------------------------------------------------------------------------------
def _check_expandable(blocks: nn.Module) -> None:
    for i, blk in enumerate(blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        proj, fc2 = getattr(attn, "proj", None), getattr(mlp, "fc2", None)
        if not (isinstance(blk, Block) and isinstance(proj, nn.Linear) and isinstance(fc2, nn.Linear)):
            raise ValueError(
                f"expand_blocks needs pre-norm timm Blocks with nn.Linear attn.proj and mlp.fc2; block {i} is "
                f"{type(blk).__name__} (attn.proj: {type(proj).__name__}, mlp.fc2: {type(fc2).__name__})"
            )


def _identity_copy(block: nn.Module) -> nn.Module:
    """A deep copy of a pre-norm block whose residual branches output zero: attn.proj and mlp.fc2 zeroed."""
    new = copy.deepcopy(block)
    with torch.no_grad():
        for linear in (new.attn.proj, new.mlp.fc2):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    return new


def expand_blocks(vit: VisionTransformer, split: int) -> list[int]:
    """Block Expansion: after every ``split``-th block insert an identity copy of it; returns the new indices.

    Walking the original blocks i = 0..N-1, block i keeps its module (its index shifts by the insertions before it);
    if (i + 1) % split == 0 a deep copy of it follows, with ``attn.proj`` and ``mlp.fc2`` weight and bias zeroed, so
    the copy adds nothing to the residual stream and the expanded model computes exactly what the original did.
    ``vit.blocks`` becomes a new container of the same type and ``vit.feature_info`` (if a per-block list) is
    re-indexed, so ``forward_features``, ``forward_head`` and ``forward_intermediates`` work on the new depth.

    E.g. N=12: split 4 -> [4, 9, 14], 3 -> [3, 7, 11, 15], 6 -> [6, 13], 12 -> [12].

    Raises:
        ValueError: ``split`` is not in 1..N, or a block is not a pre-norm timm ``Block`` with linear proj / fc2.
    """
    blocks = vit.blocks
    n = len(blocks)
    if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= n:
        raise ValueError(f"expand_blocks: split must be an int in 1..{n} (the number of blocks), got {split!r}")
    _check_expandable(blocks)
    new_blocks: list[nn.Module] = []
    sources: list[int] = []  # original index behind each new position
    added: list[int] = []
    for i, blk in enumerate(blocks):
        new_blocks.append(blk)
        sources.append(i)
        if (i + 1) % split == 0:
            added.append(len(new_blocks))
            new_blocks.append(_identity_copy(blk))
            sources.append(i)
    vit.blocks = type(blocks)(*new_blocks) if isinstance(blocks, nn.Sequential) else type(blocks)(new_blocks)
    info = getattr(vit, "feature_info", None)
    if isinstance(info, list) and len(info) == n and all(isinstance(d, dict) for d in info):
        vit.feature_info = [dict(info[src], module=f"blocks.{j}") for j, src in enumerate(sources)]
    return added


# ---- q/k/v split ---------------------------------------------------------------------------------------------------
class QKV(nn.Module):
    """Three linears ``q``, ``k``, ``v`` standing in for timm's fused ``Attention.qkv`` (dim -> 3 * attn_dim).

    The output is their concatenation, in the fused layout, so ``Attention.forward`` runs unchanged while adapters
    can target ``q`` / ``k`` / ``v`` separately by name.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v

    @property
    def in_features(self) -> int:
        return self.q.in_features

    @property
    def out_features(self) -> int:
        return self.q.out_features + self.k.out_features + self.v.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)  # (B, N, 3 * attn_dim)

    @classmethod
    def from_linear(cls, fused: nn.Linear) -> QKV:
        """Split a fused (3 * attn_dim, dim) linear into q, k, v with copies of its weight (and bias) rows."""
        if fused.out_features % 3:
            raise ValueError(f"a fused qkv needs out_features divisible by 3, got {fused.out_features}")
        weights = fused.weight.detach().chunk(3, dim=0)  # 3 x (attn_dim, dim)
        biases = fused.bias.detach().chunk(3) if fused.bias is not None else (None,) * 3  # 3 x (attn_dim,)
        return cls(*(_linear(w, b, fused.weight.requires_grad) for w, b in zip(weights, biases, strict=True)))

    def to_linear(self) -> nn.Linear:
        """The equivalent fused linear: q, k, v weight (and bias) rows concatenated (plain linears only)."""
        parts = (self.q, self.k, self.v)
        if not all(type(m) is nn.Linear for m in parts):
            kinds = [type(m).__name__ for m in parts]
            raise ValueError(f"QKV.to_linear needs plain nn.Linear q, k, v (merge adapters first), got {kinds}")
        w = torch.cat([m.weight.detach() for m in parts])  # (3 * attn_dim, dim)
        b = torch.cat([m.bias.detach() for m in parts]) if self.q.bias is not None else None  # (3 * attn_dim,)
        return _linear(w, b, self.q.weight.requires_grad)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias`` (out,), on their device and dtype."""
    out_dim, in_dim = weight.shape
    linear = nn.Linear(in_dim, out_dim, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.clone(), requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=requires_grad)
    return linear


def split_qkv(model: nn.Module) -> list[str]:
    """Replace every timm ``Attention.qkv`` linear by an equivalent ``QKV``; returns the replaced names.

    Parameter names become ``...attn.qkv.q.weight`` etc. (same count); ``merge_qkv`` undoes it exactly.

    Raises:
        ValueError: ``model`` has no timm Attention with a fused ``nn.Linear`` qkv.
    """
    names = [f"{n}.qkv" if n else "qkv" for n, m in model.named_modules()
             if isinstance(m, Attention) and type(m.qkv) is nn.Linear]  # fmt: skip
    if not names:
        raise ValueError("split_qkv: no timm Attention with a fused nn.Linear qkv in the model")
    return _replace(model, names, lambda _, fused: QKV.from_linear(fused))


def merge_qkv(model: nn.Module) -> list[str]:
    """Inverse of ``split_qkv``: replace every ``QKV`` by one fused ``nn.Linear``; returns the replaced names.

    Raises:
        ValueError: ``model`` holds no ``QKV``.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, QKV)]
    if not names:
        raise ValueError("merge_qkv: no QKV module in the model")
    return _replace(model, names, lambda _, qkv: qkv.to_linear())
