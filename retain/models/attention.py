"""Recording what a timm ViT's attention computes, without forking the model.

``record_attention(model)`` hooks every timm ``Attention`` for the duration of a ``with`` block and records, per
block in forward order, the pre-softmax scaled logits ``(q * d^-0.5) k^T`` (B, H, N, N) ("attentional") and the
per-head context ``softmax(.) V`` before the heads are merged (B, H, N, d) ("functional"), the two tensors the PAD
losses distil (Pelosin, Jha et al., CVPRW 2022). Hooks only read: the model's outputs are unchanged, and the
recorded tensors stay in the autograd graph. The fused attention kernel keeps running; the logits, which it never
materialises, are recomputed from the recorded q and k, exactly as timm's non-fused path computes them. With
``float32=True`` they are float32 whatever the autocast: the logits are computed from q and k cast to float32 with
autocast off, the context is cast (the model's own forward keeps its dtype).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import Attention
from torch import nn

__all__ = ["AttentionRecord", "attention_modules", "record_attention"]


@dataclass
class AttentionRecord:
    """Per-block tensors of one forward pass, in block order."""

    logits: list[torch.Tensor] = field(default_factory=list)  # (B, H, N, N) each
    context: list[torch.Tensor] = field(default_factory=list)  # (B, H, N, d) each


def attention_modules(model: nn.Module) -> list[Attention]:
    """timm ``Attention`` modules of ``model`` in forward (registration) order."""
    found = [m for m in model.modules() if isinstance(m, Attention)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no timm Attention module: attention can only be recorded on "
                         "timm ViTs (VisionTransformer, early_conv_vit, ...)")  # fmt: skip
    return found


def _hooks(attn: Attention, rec: AttentionRecord, logits: bool, context: bool, float32: bool) -> list:
    handles, q_store = [], {}
    if logits:
        handles.append(attn.q_norm.register_forward_hook(lambda m, i, q: q_store.__setitem__("q", q)))

        def on_k(module: nn.Module, inputs: tuple, k: torch.Tensor) -> None:
            q = q_store.pop("q")
            if not float32:
                rec.logits.append((q * attn.scale) @ k.transpose(-2, -1))  # (B, H, N, N)
                return
            with torch.autocast(q.device.type, enabled=False):
                rec.logits.append((q.float() * attn.scale) @ k.float().transpose(-2, -1))

        handles.append(attn.k_norm.register_forward_hook(on_k))
    if context:

        def on_merge(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]  # (B, N, H*d): the heads' outputs, merged but not yet normalised or projected
            B, N, _ = x.shape
            ctx = x.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, N, d)
            rec.context.append(ctx.float() if float32 else ctx)

        handles.append(attn.norm.register_forward_pre_hook(on_merge))
    return handles


@contextmanager
def record_attention(model: nn.Module, logits: bool = True, context: bool = True,
                     float32: bool = False) -> Iterator[AttentionRecord]:  # fmt: skip
    """``with record_attention(vit) as rec: vit(x)`` fills ``rec.logits`` and/or ``rec.context``, one per block
    (``float32``: float32 tensors whatever the autocast, see the module docstring)."""
    rec = AttentionRecord()
    handles = [h for attn in attention_modules(model) for h in _hooks(attn, rec, logits, context, float32)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
