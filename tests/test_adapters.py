import copy
import re

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from retain.models.adapters import (
    QKV,
    expand_blocks,
    mark_trainable,
    matches,
    merge_qkv,
    replace_modules,
    set_task,
    split_qkv,
    trainable_names,
    use_task,
)


def tiny_vit(depth: int = 12, **kwargs) -> nn.Module:
    """A 32-px, dim-32 ViT with random non-zero weights everywhere (timm zero-inits biases), in eval mode."""
    torch.manual_seed(0)
    args = dict(pretrained=False, depth=depth, embed_dim=32, num_heads=2, img_size=32, patch_size=8, num_classes=3)
    model = timm.create_model("vit_base_patch16_224", **(args | kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def vit12() -> nn.Module:
    return tiny_vit(12)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class ToyLoRA(nn.Module):
    """peft-like naming (``lora_A.default.weight``) around a frozen base linear; B is zero, so initially exact."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


# ---- parameter selection -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("blocks.0.attn.qkv.lora_A.default.weight", "*lora_*", True),
        ("blocks.0.attn.qkv.q.weight", "*lora_*", False),
        ("blocks.0.attn.qkv.lora_B.default.weight", "blocks.*.attn.qkv.lora_?.default.weight", True),
        ("blocks.11.norm1.weight", "blocks.1[01].*", True),
        ("blocks.12.norm1.weight", "blocks.1[01].*", False),
        ("blocks.0.norm1.weight", "*norm1", False),  # a glob matches the whole name, not a prefix
        ("backbone.blocks.0.norm1.weight", "backbone.", True),
        ("head.heads.3.weight", "head.heads.3.", True),
        ("head.heads.30.weight", "head.heads.3.", False),
        ("head.heads.3.weight", "head.heads.3.weight", True),  # an exact full name is a prefix of itself
        ("head.heads.3.bias", "head.heads.3.weight", False),
        ("blocks.0.attn.qkv.weight", "", True),  # the empty prefix selects everything, as startswith does
    ],
)
def test_matches_glob_or_prefix(name, pattern, expected):
    assert matches(name, pattern) is expected


def test_trainable_names_and_mark_trainable():
    model = tiny_vit(depth=2)
    model.blocks[0].attn.qkv = ToyLoRA(model.blocks[0].attn.qkv)
    all_names = [n for n, _ in model.named_parameters()]
    for prefixes in (["blocks.1.", "head."], ["cls_token", "blocks.0.attn.qkv.base_layer.weight"], []):
        reference = [n for n in all_names if any(n.startswith(p) for p in prefixes)]  # methods/base.py semantics
        assert trainable_names(model, prefixes) == reference

    lora = ["blocks.0.attn.qkv.lora_A.default.weight", "blocks.0.attn.qkv.lora_B.default.weight"]
    assert trainable_names(model, ["*lora_*"]) == lora
    assert trainable_names(model, "*lora_*") == lora  # a bare string is one pattern, not its characters
    mixed = trainable_names(model, ["head.", "*lora_*"])
    assert mixed == [n for n in all_names if n in lora or n.startswith("head.")]  # named_parameters() order

    n = mark_trainable(model, ["*lora_*", "head."])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora) | {"head.weight", "head.bias"}
    assert n == 32 * 2 + 2 * 96 + 3 * 32 + 3
    assert mark_trainable(model, []) == 0
    assert not any(p.requires_grad for p in model.parameters())


# ---- module replacement --------------------------------------------------------------------------------------------
def test_replace_modules_wraps_by_regex(images):
    model = tiny_vit(depth=2)
    before = model(images)
    seen = []

    def factory(name: str, module: nn.Module) -> nn.Module:
        seen.append((name, type(module)))
        return ToyLoRA(module)

    names = replace_modules(model, r"blocks\.\d+\.attn\.(qkv|proj)", factory)
    expected = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert names == expected
    assert seen == [(n, nn.Linear) for n in expected]
    assert all(isinstance(model.get_submodule(n), ToyLoRA) for n in expected)
    assert isinstance(model.blocks[0].mlp.fc1, nn.Linear)  # fullmatch: "fc1" is not touched
    assert len(trainable_names(model, "*lora_*")) == 8
    torch.testing.assert_close(model(images), before, rtol=0, atol=0)  # zero-init B: the same function


def test_replace_modules_outermost_wins_and_no_match_raises():
    model = tiny_vit(depth=2)
    names = replace_modules(model, r"blocks\.0(\.mlp)?(\.fc2)?", lambda _, m: nn.Identity())
    assert names == ["blocks.0"]  # blocks.0.mlp and blocks.0.mlp.fc2 lie inside the replaced block
    assert isinstance(model.blocks[0], nn.Identity)
    assert replace_modules(model, r".*", lambda _, m: m)[0] == "patch_embed"  # the root is never replaced
    with pytest.raises(ValueError, match=re.escape("'blocks[.]9'")):
        replace_modules(model, r"blocks[.]9", lambda _, m: m)


# ---- per-task switching --------------------------------------------------------------------------------------------
class TaskLinear(nn.Module):
    """Per-task linears in an ``nn.ModuleDict``; exposes ``task`` (restorable by use_task)."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.rows = nn.ModuleDict({str(t): nn.Linear(4, 4) for t in range(n_tasks)})
        self.task = 0

    def set_task(self, task: int) -> None:
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows[str(self.task)](x)


class TaskScale(nn.Module):
    """Per-task scales in an ``nn.ParameterList``; keeps the selected one but exposes no ``task``."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.scales = nn.ParameterList([nn.Parameter(torch.full((4,), t + 1.0)) for t in range(n_tasks)])
        self._active = 0

    def set_task(self, task: int) -> None:
        self._active = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scales[self._active]


class TaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.s, self.b = TaskLinear(3), TaskScale(3), TaskLinear(3)
        self.plain = nn.Linear(4, 4)
        self.plain.set_task = "not callable"  # ignored: only callable set_task attributes count
        self.own_calls: list[int] = []

    def set_task(self, task: int) -> None:  # the root's own method is not called by set_task(model, ...)
        self.own_calls.append(task)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(self.b(self.s(self.a(x))))


def test_set_task_switches_every_submodule_but_the_root():
    torch.manual_seed(0)
    net, x = TaskNet(), torch.randn(2, 4)
    out0 = net(x)
    assert set_task(net, 2) == 3
    assert (net.a.task, net.s._active, net.b.task) == (2, 2, 2)
    assert net.own_calls == []
    out2 = net(x)
    assert not torch.allclose(out0, out2)
    set_task(net, 0)
    torch.testing.assert_close(net(x), out0, rtol=0, atol=0)
    assert set_task(nn.Sequential(nn.Linear(2, 2)), 1) == 0


def test_use_task_restores_modules_with_a_task_attribute():
    torch.manual_seed(0)
    net, x = TaskNet(), torch.randn(2, 4)
    net.a.set_task(1)
    with use_task(net, 2) as n:
        assert n == 3
        assert (net.a.task, net.s._active, net.b.task) == (2, 2, 2)
        inside = net(x)
    assert (net.a.task, net.b.task) == (1, 0)  # restored
    assert net.s._active == 2  # no ``task`` attribute: cannot be restored, keeps the task
    set_task(net, 2)
    torch.testing.assert_close(net(x), inside, rtol=0, atol=0)

    net.a.set_task(0)
    with pytest.raises(RuntimeError, match="boom"), use_task(net, 1):
        assert net.a.task == 1
        raise RuntimeError("boom")
    assert (net.a.task, net.b.task) == (0, 2)


# ---- Block Expansion -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "split, expected",
    [(4, [4, 9, 14]), (3, [3, 7, 11, 15]), (6, [6, 13]), (12, [12]), (11, [11]), (1, list(range(1, 24, 2)))],
)
def test_expand_blocks_indices(vit12, split, expected):
    model = copy.deepcopy(vit12)
    originals = list(model.blocks)
    assert expand_blocks(model, split) == expected
    assert isinstance(model.blocks, nn.Sequential)
    assert len(model.blocks) == 12 + len(expected)
    kept = [blk for j, blk in enumerate(model.blocks) if j not in expected]
    assert all(a is b for a, b in zip(kept, originals, strict=True))  # the original modules, in order
    for j in expected:
        new = model.blocks[j]
        assert new is not model.blocks[j - 1]
        for part in (new.attn.proj, new.mlp.fc2):
            assert not part.weight.any() and not part.bias.any()
        torch.testing.assert_close(new.attn.qkv.weight, model.blocks[j - 1].attn.qkv.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.norm2.weight, model.blocks[j - 1].norm2.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.mlp.fc1.bias, model.blocks[j - 1].mlp.fc1.bias, rtol=0, atol=0)
    assert [d["module"] for d in model.feature_info] == [f"blocks.{j}" for j in range(len(model.blocks))]


def test_expand_blocks_is_exactly_the_same_function(vit12, images):
    model = copy.deepcopy(vit12)
    new = expand_blocks(model, 4)
    with torch.no_grad():
        feats, feats0 = model.forward_features(images), vit12.forward_features(images)
        assert torch.equal(feats, feats0)
        assert torch.equal(model.forward_head(feats), vit12.forward_head(feats0))
        assert torch.equal(model(images), vit12(images))
        # the new block at j repeats the output of the original block before it (3, 7, 11)
        final, inter = model.forward_intermediates(images, indices=new, output_fmt="NLC")
        final0, inter0 = vit12.forward_intermediates(images, indices=[3, 7, 11], output_fmt="NLC")
        assert torch.equal(final, final0) and len(inter) == 3
        assert all(torch.equal(a, b) for a, b in zip(inter, inter0, strict=True))
        (last,) = model.forward_intermediates(images, indices=1, intermediates_only=True)  # the last of 15 blocks
        assert last.shape == (2, 32, 4, 4)  # NCHW
        assert torch.equal(last, inter0[-1].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))


def test_expand_blocks_new_parameters_train_alone(vit12, images):
    model = copy.deepcopy(vit12)
    new = expand_blocks(model, 6)
    prefixes = [f"blocks.{j}." for j in new]
    old_ptrs = {p.data_ptr() for n, p in model.named_parameters() if not any(n.startswith(q) for q in prefixes)}
    new_params = [p for n, p in model.named_parameters() if any(n.startswith(q) for q in prefixes)]
    assert new_params and not old_ptrs & {p.data_ptr() for p in new_params}  # distinct storage

    n = mark_trainable(model, prefixes)
    assert n == 2 * sum(p.numel() for p in vit12.blocks[0].parameters())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not any(k.startswith(q) for q in prefixes)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.forward_features(images).square().mean().backward()
    opt.step()

    with torch.no_grad():
        assert not torch.equal(model.forward_features(images), vit12.forward_features(images))
    assert model.blocks[6].attn.proj.weight.abs().sum() > 0
    for k, v in frozen_before.items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.testing.assert_close(model.blocks[5].mlp.fc2.weight, vit12.blocks[5].mlp.fc2.weight, rtol=0, atol=0)
    assert not vit12.blocks[5].mlp.fc2.weight.eq(0).all()  # the source block was not zeroed


@pytest.mark.parametrize("split", [0, 13, -1, 2.0, True])
def test_expand_blocks_rejects_bad_split(vit12, split):
    model = copy.deepcopy(vit12)
    with pytest.raises(ValueError, match=r"split must be an int in 1\.\.12"):
        expand_blocks(model, split)
    assert len(model.blocks) == 12


def test_expand_blocks_rejects_other_blocks():
    post = tiny_vit(depth=2, block_fn=ResPostBlock)
    with pytest.raises(ValueError, match="block 0 is ResPostBlock"):
        expand_blocks(post, 1)
    model = tiny_vit(depth=2)
    replace_modules(model, r"blocks\.1\.mlp\.fc2", lambda _, m: ToyLoRA(m))
    with pytest.raises(ValueError, match=r"block 1 is Block .*mlp\.fc2: ToyLoRA"):
        expand_blocks(model, 1)
    assert len(model.blocks) == 2


# ---- q/k/v split ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_split_qkv_same_function_and_merge_restores(images, qkv_bias):
    model = tiny_vit(depth=2, qkv_bias=qkv_bias)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model.forward_features(images)

    assert split_qkv(model) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, QKV) and (qkv.in_features, qkv.out_features) == (32, 96)
    names = dict(model.named_parameters())
    assert "blocks.0.attn.qkv.q.weight" in names and "blocks.1.attn.qkv.v.weight" in names
    assert ("blocks.0.attn.qkv.k.bias" in names) is qkv_bias and "blocks.0.attn.qkv.weight" not in names
    assert sum(p.numel() for p in model.parameters()) == n_params
    torch.testing.assert_close(qkv.v.weight, state["blocks.0.attn.qkv.weight"][64:], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), before, rtol=0, atol=1e-6)

    assert merge_qkv(model) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert type(model.blocks[1].attn.qkv) is nn.Linear
    restored = model.state_dict()
    assert list(restored) == list(state)
    assert all(torch.equal(restored[k], v) for k, v in state.items())


def test_qkv_copies_and_lora_on_query_and_value(images):
    model = tiny_vit(depth=2)
    fused = model.blocks[0].attn.qkv
    split_qkv(model)
    qkv = model.blocks[0].attn.qkv
    assert qkv.q.weight.data_ptr() != fused.weight.data_ptr()  # copies: training one leaves the other
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(qkv(x), fused(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        before = model.forward_features(images)

    wrapped = replace_modules(model, r".*\.attn\.qkv\.(q|v)", lambda _, m: ToyLoRA(m))
    assert wrapped == ["blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v", "blocks.1.attn.qkv.q", "blocks.1.attn.qkv.v"]
    assert mark_trainable(model, "*lora_*") == 4 * (32 * 2 + 2 * 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="merge adapters first"):
        merge_qkv(model)


def test_split_and_merge_need_their_modules():
    with pytest.raises(ValueError, match="no timm Attention"):
        split_qkv(nn.Sequential(nn.Linear(4, 12)))
    with pytest.raises(ValueError, match="no QKV"):
        merge_qkv(tiny_vit(depth=1))
    with pytest.raises(ValueError, match="divisible by 3"):
        QKV.from_linear(nn.Linear(4, 10))


def test_split_qkv_then_expand_blocks(vit12, images):
    model = copy.deepcopy(vit12)
    split_qkv(model)
    assert expand_blocks(model, 12) == [12]
    assert isinstance(model.blocks[12].attn.qkv, QKV)
    assert model.blocks[12].attn.qkv.q.weight.data_ptr() != model.blocks[11].attn.qkv.q.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), vit12.forward_features(images), rtol=0, atol=1e-5)
