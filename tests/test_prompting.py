"""Prompt seams on timm ViTs (retain.models.prompting): PROMPTS.md §10 tests 1-2, plus prompt-tuning (§2.2)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Attention

from retain.models.prompting import (
    PrefixAttention,
    add_prefix_attention,
    prefixes,
    prompt_token_mean,
    prompted_features,
)

H, D, DH = 2, 32, 16  # heads, width, head dim
N_PATCH = 16  # (32 / 8) ** 2


def tiny_vit(fused: bool = True, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=D, depth=2,
                            num_heads=H, num_classes=0, **kwargs)  # fmt: skip
    for m in vit.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused
    return vit.eval()


def images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def random_prefix(b: int = 2, length: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, length, DH, generator=g), torch.randn(b, H, length, DH, generator=g)


VARIANTS = [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}, {"qk_norm": True}]


# ---- prefix-tuning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kwargs", VARIANTS)
def test_no_prefix_and_empty_prefix_are_bit_identical(fused: bool, kwargs: dict) -> None:
    plain = tiny_vit(fused, **kwargs)
    vit = copy.deepcopy(plain)
    add_prefix_attention(vit, [0, 1])
    x = images()
    ref = plain.forward_features(x)
    assert torch.equal(vit.forward_features(x), ref)
    with prefixes(vit, {0: random_prefix(length=0), 1: random_prefix(b=1, length=0)}):
        assert torch.equal(vit.forward_features(x), ref)


def reference_attention(attn: Attention, x: torch.Tensor, p_k: torch.Tensor, p_v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K'^T * scale) V' then proj, with K' = [p_k, k_norm(K)], V' = [p_v, V], written out by hand."""
    B, N, _ = x.shape
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (B, N, 3 * D)
    q, k, v = (t.reshape(B, N, H, DH).transpose(1, 2) for t in qkv.split(D, dim=-1))  # (B, H, N, DH)
    q, k = attn.q_norm(q), attn.k_norm(k)
    k, v = torch.cat([p_k.expand(B, -1, -1, -1), k], 2), torch.cat([p_v.expand(B, -1, -1, -1), v], 2)
    weights = torch.softmax(q @ k.transpose(-2, -1) * DH**-0.5, dim=-1)  # (B, H, N, L + N)
    out = (weights @ v).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("batch_of_prefix", [2, 1])
def test_prefix_matches_hand_written_attention(fused: bool, qk_norm: bool, batch_of_prefix: int) -> None:
    vit = tiny_vit(fused, qk_norm=qk_norm)
    if qk_norm:  # make the norms non-trivial, so applying them to the prefix would show
        with torch.no_grad():
            for p in vit.blocks[0].attn.k_norm.parameters():
                p.normal_()
    (attn,) = add_prefix_attention(vit, [0])
    x = torch.randn(2, 1 + N_PATCH, D, generator=torch.Generator().manual_seed(3))
    p_k, p_v = random_prefix(b=batch_of_prefix)
    attn.prefix = (p_k, p_v)
    torch.testing.assert_close(attn(x), reference_attention(attn.base_layer, x, p_k, p_v), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_each_sample_uses_only_its_own_prefix(fused: bool) -> None:
    vit = tiny_vit(fused)
    add_prefix_attention(vit, [0, 1])
    x = images()
    p0, p1 = random_prefix(), random_prefix(seed=5)
    with prefixes(vit, {0: p0, 1: p1}):
        out = vit.forward_features(x)
    changed = tuple(p.clone() for p in p1)
    for p in changed:
        p[1] += 1.0
    with prefixes(vit, {0: p0, 1: changed}):
        out2 = vit.forward_features(x)
    torch.testing.assert_close(out2[0], out[0], atol=1e-6, rtol=0)
    assert not torch.allclose(out2[1], out[1], atol=1e-3)
    assert not torch.allclose(out, vit.forward_features(x), atol=1e-3)  # the prefix did change the output


def test_broadcast_prefix_equals_expanded() -> None:
    vit = tiny_vit()
    add_prefix_attention(vit, [1])
    p_k, p_v = random_prefix(b=1)
    with prefixes(vit, {1: (p_k, p_v)}):
        out = vit.forward_features(images())
    with prefixes(vit, {1: (p_k.expand(2, -1, -1, -1), p_v.expand(2, -1, -1, -1))}):
        torch.testing.assert_close(vit.forward_features(images()), out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_gradients_reach_the_prefix_through_a_frozen_backbone(fused: bool) -> None:
    vit = tiny_vit(fused)
    vit.requires_grad_(False)
    add_prefix_attention(vit, [0, 1])
    p_k, p_v = (p.requires_grad_() for p in random_prefix())
    with prefixes(vit, {0: (p_k, p_v)}):
        vit.forward_features(images())[:, 0].sum().backward()
    assert p_k.grad is not None and p_k.grad.abs().sum() > 0
    assert p_v.grad is not None and p_v.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())


def test_prefixes_are_cleared_on_exit_and_on_exception() -> None:
    vit = tiny_vit()
    wrappers = add_prefix_attention(vit, [0, 1])
    with prefixes(vit, {0: random_prefix()}):
        assert wrappers[0].prefix is not None and wrappers[1].prefix is None
    assert all(w.prefix is None for w in wrappers)
    with pytest.raises(RuntimeError, match="boom"), prefixes(vit, {0: random_prefix(), 1: random_prefix()}):
        raise RuntimeError("boom")
    assert all(w.prefix is None for w in wrappers)
    with pytest.raises(ValueError, match=r"\(B or 1, H, L, d_h\)"), prefixes(vit, {0: random_prefix(b=3)}):
        vit.forward_features(images())  # batch 3 prefix on a batch of 2
    assert wrappers[0].prefix is None


def test_errors_are_clear() -> None:
    vit = tiny_vit()
    with pytest.raises(ValueError, match="add_prefix_attention"), prefixes(vit, {0: random_prefix()}):
        pass
    with pytest.raises(ValueError, match="0..1"):
        add_prefix_attention(vit, [2])
    (attn,) = add_prefix_attention(vit, [0])
    attn.prefix = random_prefix()
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.randn(2, 17, D), is_causal=True)
    with pytest.raises(TypeError, match="timm Attention"):
        PrefixAttention(torch.nn.Linear(2, 2))


def test_wrapping_is_idempotent_and_keeps_parameter_names() -> None:
    plain = tiny_vit()
    vit = copy.deepcopy(plain)
    first = add_prefix_attention(vit, [0, 1])
    assert add_prefix_attention(vit, [1, 0]) == first[::-1]
    assert isinstance(vit.blocks[0].attn, PrefixAttention)
    assert not isinstance(vit.blocks[0].attn.base_layer, PrefixAttention)
    # state_dict keys are the plain model's (blocks.0.attn.qkv.weight, ...): plain/pretrained checkpoints load as is
    assert list(vit.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in vit.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert "blocks.0.attn.qkv.weight" in vit.state_dict()
    other = tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    vit.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(vit.blocks[0].attn.base_layer.qkv.weight, other.blocks[0].attn.qkv.weight)
    vit.train()
    assert vit.blocks[0].attn.base_layer.training and vit.blocks[0].attn.training
    vit.blocks[0].attn.fused_attn = False
    assert vit.blocks[0].attn.base_layer.fused_attn is False


# ---- prompt-tuning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kwargs", VARIANTS + [{"reg_tokens": 2, "no_embed_class": True}])
@pytest.mark.parametrize("prompt_pos", ["cls", "none"])
def test_no_prompts_equal_forward_features(fused: bool, kwargs: dict, prompt_pos: str) -> None:
    vit = tiny_vit(fused, **kwargs)
    x = images()
    empty = torch.zeros(2, 0, D)
    assert torch.equal(prompted_features(vit, x, empty, prompt_pos), vit.forward_features(x))


def hand_prompted(vit: torch.nn.Module, x: torch.Tensor, prompts: torch.Tensor, cls_pos: bool) -> torch.Tensor:
    """[CLS + pos0, prompts (+ pos0), patches + pos] built by hand, then norm_pre, blocks and norm."""
    B = x.shape[0]
    patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]  # (B, N, D)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
    prompts = prompts + vit.pos_embed[:, :1] if cls_pos else prompts  # (B, P, D)
    return vit.norm(vit.blocks(vit.norm_pre(torch.cat([cls, prompts, patches], dim=1))))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("prompt_pos", ["cls", "none"])
def test_prompts_match_hand_made_sequence(fused: bool, prompt_pos: str) -> None:
    vit = tiny_vit(fused)
    x, prompts = images(), torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    out = prompted_features(vit, x, prompts, prompt_pos)
    assert out.shape == (2, 1 + 5 + N_PATCH, D)
    torch.testing.assert_close(out, hand_prompted(vit, x, prompts, prompt_pos == "cls"), atol=1e-6, rtol=0)
    other = hand_prompted(vit, x, prompts, prompt_pos != "cls")
    assert not torch.allclose(out, other, atol=1e-3)  # "cls" and "none" do differ


def test_prompts_go_after_register_tokens_and_broadcast() -> None:
    vit = tiny_vit(reg_tokens=2)
    x, prompts = images(), torch.randn(1, 4, D, generator=torch.Generator().manual_seed(4))
    out = prompted_features(vit, x, prompts)
    assert out.shape == (2, 3 + 4 + N_PATCH, D)
    torch.testing.assert_close(out, prompted_features(vit, x, prompts.expand(2, -1, -1)), atol=1e-6, rtol=0)
    seq = vit._pos_embed(vit.patch_embed(x))  # (B, 3 + N, D)
    hand = torch.cat([seq[:, :3], prompts.expand(2, -1, -1) + vit.pos_embed[:, :1], seq[:, 3:]], dim=1)
    torch.testing.assert_close(out, vit.norm(vit.blocks(hand)), atol=1e-6, rtol=0)


def test_prompt_gradients_and_errors() -> None:
    vit = tiny_vit()
    vit.requires_grad_(False)
    prompts = torch.randn(2, 3, D, requires_grad=True)
    prompt_token_mean(prompted_features(vit, images(), prompts), n_prompts=3).sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())
    for kwargs in ({"reg_tokens": 2, "no_embed_class": True}, {"class_token": False, "global_pool": "avg"}):
        with pytest.raises(ValueError, match="prompt_pos='none'"):
            prompted_features(tiny_vit(**kwargs), images(), prompts)
    with pytest.raises(ValueError, match="prompt_pos"):
        prompted_features(vit, images(), prompts, "first")
    with pytest.raises(ValueError, match=r"\(B or 1, P, D\)"):
        prompted_features(vit, images(), torch.randn(3, 3, D))


def test_prompt_token_mean() -> None:
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    torch.testing.assert_close(prompt_token_mean(tokens, n_prompts=2, n_prefix=1), tokens[:, 1:3].mean(1))
    torch.testing.assert_close(prompt_token_mean(tokens, n_prompts=3, n_prefix=3), tokens[:, 3:6].mean(1))
    with pytest.raises(ValueError, match="n_prompts"):
        prompt_token_mean(tokens, n_prompts=0)
