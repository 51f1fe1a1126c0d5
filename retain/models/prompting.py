"""Prompt seams on any timm ViT, without forking it (PROMPTS.md §9).

- Prefix-tuning (DualPrompt, Wang et al., ECCV 2022; CODA-Prompt, Smith et al., CVPR 2023, and its L2P++):
  ``add_prefix_attention`` wraps chosen blocks' ``attn`` in a ``PrefixAttention``; ``with prefixes(vit, {l: (p_k,
  p_v)})`` puts per-sample key/value prefixes (B, H, L, d_h) in front of those blocks' keys and values for one
  forward (PROMPTS.md §3.2, §4.2). The sequence length is unchanged.
- Prompt-tuning (L2P, Wang et al., CVPR 2022): ``prompted_features`` runs timm's pieces by hand with prompt tokens
  inserted after the prefix (CLS / register) tokens, [CLS, prompts, patches]; ``prompt_token_mean`` is L2P's
  classifier input, the mean of the prompt tokens' outputs (PROMPTS.md §2.2, §2.4).

Nothing here owns a parameter: prompts, keys and their selection live in the method; these functions only say where
the prompt tensors enter, so gradients reach them and no backbone weight is needed to require grad.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["PrefixAttention", "add_prefix_attention", "prefixes", "prompted_features", "prompt_token_mean"]

Prefix = tuple[torch.Tensor, torch.Tensor]  # (p_k, p_v), each (B or 1, H, L, d_h)


# ---- prefix-tuning -------------------------------------------------------------------------------------------------
class PrefixAttention(nn.Module):
    """A timm ``Attention`` whose keys and values get a per-sample prefix when ``prefix`` is set (PROMPTS.md §3.2).

    The wrapped module (``base_layer``, peft's name) is *not* registered as a child: its children (``qkv``,
    ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``) are registered here under
    their own names, as the same module objects. So parameter and state_dict names are those of the plain model
    (``blocks.0.attn.qkv.weight``): pretrained and plain checkpoints load unchanged, and hooks on the children fire.

    With no prefix, or one of length 0, ``forward`` is ``base_layer.forward`` (bit-identical to the plain model).
    With a prefix it is timm 1.0's ``Attention.forward`` with ``k = [p_k, k_norm(k)]``, ``v = [p_v, v]`` along the
    sequence axis (q / k norms apply to the original q, k only; prefixes get no norm and no projection).
    """

    def __init__(self, base_layer: Attention) -> None:
        super().__init__()
        if not isinstance(base_layer, Attention):
            raise TypeError(f"PrefixAttention wraps a timm Attention, got {type(base_layer).__name__}")
        object.__setattr__(self, "_base", base_layer)  # not a child: keeps the plain model's parameter names
        for name, child in base_layer.named_children():
            self.add_module(name, child)
        self.prefix: Prefix | None = None
        self.train(base_layer.training)

    @property
    def base_layer(self) -> Attention:
        return self._base

    @property
    def fused_attn(self) -> bool:
        return self._base.fused_attn

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self._base.fused_attn = value

    def train(self, mode: bool = True) -> PrefixAttention:
        self._base.training = mode  # the base's own flag drives dropout_p in its fused path
        return super().train(mode)

    def _check(self, q: torch.Tensor, p_k: torch.Tensor, p_v: torch.Tensor) -> None:
        B, H, _, d = q.shape
        for name, p in (("p_k", p_k), ("p_v", p_v)):
            if p.ndim != 4 or p.shape[0] not in (1, B) or p.shape[1] != H or p.shape[3] != d:
                raise ValueError(f"PrefixAttention: {name} must be (B or 1, H, L, d_h) = ({B} or 1, {H}, L, {d}), "
                                 f"got {tuple(p.shape)}")  # fmt: skip
        if p_k.shape[2] != p_v.shape[2]:
            raise ValueError(f"PrefixAttention: p_k and p_v lengths differ: {p_k.shape[2]} vs {p_v.shape[2]}")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.prefix is None or self.prefix[0].shape[2] == 0:
            return self._base(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("PrefixAttention: attn_mask / is_causal are not supported together with a prefix")
        base = self._base
        B, N, _ = x.shape
        gate = base.gate(x).sigmoid() if base.gate is not None else None
        qkv = base.qkv(x).reshape(B, N, 3, base.num_heads, base.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv.unbind(0)  # (B, H, N, d) each
        q, k = base.q_norm(q), base.k_norm(k)
        p_k, p_v = self.prefix
        self._check(q, p_k, p_v)
        k = torch.cat([p_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, H, L + N, d)
        v = torch.cat([p_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)  # (B, H, L + N, d)
        if base.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=base.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * base.scale) @ k.transpose(-2, -1)  # (B, H, N, L + N)
            x = base.attn_drop(attn.softmax(dim=-1)) @ v  # (B, H, N, d)
        x = base.norm(x.transpose(1, 2).reshape(B, N, base.attn_dim))  # (B, N, H * d)
        if gate is not None:
            x = x * gate
        return base.proj_drop(base.proj(x))  # (B, N, D)


def _block_attn(vit: VisionTransformer, i: int) -> nn.Module:
    depth = len(vit.blocks)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth:
        raise ValueError(f"block index must be an int in 0..{depth - 1}, got {i!r}")
    return vit.blocks[i].attn


def add_prefix_attention(vit: VisionTransformer, blocks: list[int]) -> list[PrefixAttention]:
    """Wrap ``vit.blocks[i].attn`` in a ``PrefixAttention`` for each ``i`` in ``blocks``; returns the wrappers.

    Idempotent: an already wrapped block keeps (and returns) its wrapper. Parameter names do not change.

    Raises:
        ValueError: an index is out of range.
        TypeError: a block's ``attn`` is not a timm ``Attention``.
    """
    wrappers = []
    for i in blocks:
        attn = _block_attn(vit, i)
        if not isinstance(attn, PrefixAttention):
            attn = PrefixAttention(attn)
            vit.blocks[i].attn = attn
        wrappers.append(attn)
    return wrappers


@contextmanager
def prefixes(vit: VisionTransformer, by_block: Mapping[int, Prefix]) -> Iterator[None]:
    """Set ``{block: (p_k, p_v)}`` prefixes, each (B or 1, H, L, d_h), for a ``with`` block; always restore.

    On exit (also on an exception) each touched block gets back the prefix it had before (``None`` normally).

    Raises:
        ValueError: a block was not wrapped by ``add_prefix_attention``, or its index is out of range.
    """
    modules = {}
    for i, prefix in by_block.items():
        attn = _block_attn(vit, i)
        if not isinstance(attn, PrefixAttention):
            raise ValueError(f"block {i} has no PrefixAttention: call add_prefix_attention(vit, [{i}]) first")
        if len(prefix) != 2 or any(not torch.is_tensor(p) or p.ndim != 4 for p in prefix):
            raise ValueError(f"block {i}: a prefix is a pair (p_k, p_v) of 4-d tensors (B or 1, H, L, d_h)")
        modules[i] = (attn, tuple(prefix))
    before = [(attn, attn.prefix) for attn, _ in modules.values()]
    try:
        for attn, prefix in modules.values():
            attn.prefix = prefix
        yield
    finally:
        for attn, previous in before:
            attn.prefix = previous


# ---- prompt-tuning -------------------------------------------------------------------------------------------------
def _cls_pos(vit: VisionTransformer) -> torch.Tensor:
    """The class token's position embedding (1, 1, D); L2P-pt gives each prompt a copy of it (PROMPTS.md §2.2)."""
    if vit.cls_token is None or vit.pos_embed is None or vit.no_embed_class:
        raise ValueError("prompt_pos='cls' needs a class token with its own position embedding (class_token=True, "
                         "no_embed_class=False, a pos_embed); use prompt_pos='none'")  # fmt: skip
    return vit.pos_embed[:, :1]


def prompted_features(
    vit: VisionTransformer, x: torch.Tensor, prompts: torch.Tensor, prompt_pos: Literal["cls", "none"] = "cls"
) -> torch.Tensor:
    """``forward_features`` with prompt tokens (B, P, D) after the prefix tokens: [CLS, regs, prompts, patches].

    L2P prompt-tuning (Wang et al., CVPR 2022; PROMPTS.md §2.2): ``prompt_pos="cls"`` adds the class token's position
    embedding to each prompt (L2P-pt), followed by ``pos_drop`` as for the other tokens; ``"none"`` adds nothing
    (JAX). ``patch_drop`` runs before the prompts are inserted, so it can only drop patches. With P = 0 this is
    ``vit.forward_features(x)`` bit for bit. Returns the normed tokens (B, n_prefix + P + N, D).
    """
    if prompt_pos not in ("cls", "none"):
        raise ValueError(f"prompt_pos must be 'cls' or 'none', got {prompt_pos!r}")
    x = vit._pos_embed(vit.patch_embed(x))  # (B, n_prefix + N, D)
    x = vit.patch_drop(x)
    if prompts.shape[1] > 0:
        if prompts.ndim != 3 or prompts.shape[0] not in (1, x.shape[0]) or prompts.shape[2] != x.shape[2]:
            raise ValueError(f"prompts must be (B or 1, P, D) = ({x.shape[0]} or 1, P, {x.shape[2]}), got "
                             f"{tuple(prompts.shape)}")  # fmt: skip
        prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, P, D)
        if prompt_pos == "cls":
            prompts = vit.pos_drop(prompts + _cls_pos(vit))
        n = vit.num_prefix_tokens
        x = torch.cat([x[:, :n], prompts, x[:, n:]], dim=1)  # (B, n_prefix + P + N, D)
    x = vit.norm_pre(x)
    if vit.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)  # (B, n_prefix + P + N, D)


def prompt_token_mean(tokens: torch.Tensor, n_prompts: int, n_prefix: int = 1) -> torch.Tensor:
    """Mean of the prompt tokens' outputs (B, D), L2P's classifier input (``head_type='prompt'``, PROMPTS.md §2.4).

    ``tokens`` (B, n_prefix + P + N, D) as ``prompted_features`` returns them, ``n_prefix = vit.num_prefix_tokens``.
    """
    if n_prompts < 1:
        raise ValueError(f"prompt_token_mean needs n_prompts >= 1, got {n_prompts}")
    return tokens[:, n_prefix : n_prefix + n_prompts].mean(dim=1)  # (B, D)
