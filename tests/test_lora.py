"""LoRA through peft on the split q/v projections (Bafghi et al., CVPRW 2024): exact at init, only q and v adapted,
merged inference equal to the un-merged model, per-task adapters, checkpoints, export, the paper's counts."""

import pytest
import torch
from torch import nn

from retain.config import ConfigError, load_config
from retain.engine import RunContext, build_run, fit_task
from retain.inspect import inspect_config
from retain.methods.base import mark_trainable
from retain.methods.lora import lora_layers
from retain.models.adapters import QKV

from conftest import build_with_random_weights, interrupted_then_resumed

CPU = torch.device("cpu")
VIT = "{depth: 3, embed_dim: 32, num_heads: 2, img_size: 16}"


def _build(tiny, **extra):
    """(method, the model before surgery) on a dry 2-task scenario, backbone weights random and non-zero."""
    over = {"model.kwargs": VIT, "data.num_classes": "4", "method.name": "lora", **extra}
    return build_with_random_weights(tiny(**over))


def _randomise_lora(method):
    with torch.no_grad():
        for n, p in method.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.3)


def test_split_and_zero_b_compute_the_original_function(tiny):
    method, reference = _build(tiny, **{"scenario.protocol": "task_il"})
    x = torch.randn(3, 3, 16, 16)  # (B, 3, H, W)
    method.model.eval()
    for t in (0, 1):
        diff = (method.predict(x, t).logits - reference(x)).abs().max().item()  # peft's un-merged path (B = 0)
        assert diff < 1e-6, diff
    with method.deployed():
        assert (method.predict(x, 0).logits - reference(x)).abs().max().item() < 1e-6  # fused back into one linear


def test_lora_sits_on_q_and_v_of_every_block_with_the_papers_settings(tiny):
    method, _ = _build(tiny, **{"method.r": "4"})
    layers = lora_layers(method.model)
    names = sorted(n.split("backbone.")[1] for n, m in method.model.named_modules() if m in layers)
    assert names == [f"blocks.{i}.attn.qkv.{p}" for i in range(3) for p in ("q", "v")]
    for layer in layers:
        assert layer.scaling == {"shared": 1.0} and layer.r == {"shared": 4}  # alpha = r
        assert isinstance(layer.lora_dropout["shared"], nn.Identity)
        assert not layer.lora_B["shared"].weight.any() and layer.lora_A["shared"].weight.any()
        assert layer.base_layer.bias is not None  # timm's qkv bias, kept on the base linear
    assert all(type(m.qkv.k) is nn.Linear for m in method.attentions)


def test_only_lora_matrices_and_the_head_receive_gradients(tiny):
    method, _ = _build(tiny, **{"scenario.protocol": "task_il"})
    task = method.scenario.tasks[1]
    method.before_task(task)
    mark_trainable(method.model, method.trainable_prefixes(task))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([2, 3, 2, 3])
    sum(method.loss((x, y), method.stages(task)[0]).values()).backward()
    with_grad = {n for n, p in method.model.named_parameters() if p.grad is not None}
    assert with_grad and all(".task_1." in n or n.startswith("head.heads.1.") for n in with_grad)
    assert len(with_grad) == 3 * 2 * 2 + 2  # 3 blocks x (q, v) x (A, B) + head weight, bias


def test_merged_inference_equals_the_unmerged_model_and_leaves_no_drift(tiny):
    method, _ = _build(tiny)
    _randomise_lora(method)
    x = torch.randn(5, 3, 16, 16)
    method.model.eval()
    unmerged = method.predict(x).logits
    feats = method.features(x)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    for _ in range(3):  # several evaluations: merge and un-merge repeatedly
        with method.deployed():
            assert all(type(m.qkv) is nn.Linear for m in method.attentions)  # a plain timm ViT: no extra cost
            assert not lora_layers(method.model)
            torch.testing.assert_close(method.predict(x).logits, unmerged, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(method.features(x), feats, rtol=1e-5, atol=1e-5)
    assert all(isinstance(m.qkv, QKV) for m in method.attentions)
    after = method.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_task_il_keeps_each_tasks_adapter_and_routes_by_task_id(tiny):
    cfg = load_config(None, tiny(**{"method.name": "lora", "scenario.protocol": "task_il", "train.lr": "0.1"}))
    scenario, method = build_run(cfg, CPU)
    ctx = RunContext(cfg.train, CPU)
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(4)])
    fit_task(method, scenario.tasks[0], ctx)
    after0 = method.predict(x, 0).logits
    adapter0 = {k: v.clone() for k, v in method.model.state_dict().items() if ".task_0." in k}
    fit_task(method, scenario.tasks[1], ctx)
    assert method.task_aware_predict and adapter0
    assert all(torch.equal(method.model.state_dict()[k], v) for k, v in adapter0.items())
    torch.testing.assert_close(method.predict(x, 0).logits[:, :2], after0[:, :2], rtol=0, atol=0)
    with method.deployed():  # re-fused per task id
        torch.testing.assert_close(method.predict(x, 0).logits[:, :2], after0[:, :2], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(method.predict(x, 1).logits[:, :2], after0[:, :2])
    lora_values = 1 * 2 * 2 * 4 * 32  # 1 block x (q, v) x (A, B) x r x dim
    assert method.bytes_per_task(scenario.tasks[1]) == 4 * (lora_values + 2 * 32 + 2)


def test_class_il_trains_one_shared_adapter(tiny):
    method, _ = _build(tiny)
    assert method.adapters == ["shared"] and not method.task_aware_predict
    lora = ["backbone.*.lora_A.shared.*", "backbone.*.lora_B.shared.*"]
    assert method.trainable_prefixes(method.scenario.tasks[1]) == [*lora, "head.heads.1."]  # train_mask=current
    seen, _ = _build(tiny, **{"method.train_mask": "seen"})
    assert seen.trainable_prefixes(method.scenario.tasks[1]) == [*lora, "head.heads.0.", "head.heads.1."]
    with pytest.raises(ConfigError, match="per_task=true needs the task id"):
        _build(tiny, **{"method.per_task": "true"})
    with pytest.raises(ConfigError, match="method.targets"):
        _build(tiny, **{"method.targets": "[q, proj]"})


@pytest.mark.parametrize("protocol", ["task_il", "class_il"])
def test_resume_gives_the_uninterrupted_result(tiny, monkeypatch, protocol):
    over = tiny(**{"method.name": "lora", "scenario.protocol": protocol, "train.lr": "0.1"})
    full, resumed = interrupted_then_resumed(over, monkeypatch)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["trainable_params"] == full["trainable_params"]


@pytest.mark.parametrize("r, lora_values", [(4, 147_456), (8, 294_912), (16, 589_824)])
def test_vit_b16_trainable_counts_equal_the_papers_table(r, lora_values):
    with torch.device("meta"):  # the real ViT-B/16 architecture, no weights allocated
        info = inspect_config(load_config(f"peft_vit/cifar100_lora_r{r}"))
    assert info["trainable_params"] == lora_values + 76_900  # + one fresh 100-class head
    assert info["backbone_params"] == 85_798_656 + lora_values


def test_a_backbone_without_timm_attention_is_one_clear_error(tiny):
    over = tiny(**{"method.name": "lora", "model.backbone": "cifar_resnet20", "model.kwargs": "{}"})
    with pytest.raises(ConfigError, match="lora needs a timm ViT backbone"):
        build_run(load_config(None, over), CPU)
