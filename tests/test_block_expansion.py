"""Block Expansion (Bafghi et al., CVPRW 2024): identity at init, what trains, per-task routing, the prefix cache,
checkpoints, export, the paper's parameter counts, and the fine-tuning protocol with retention."""

import copy
import json

import pytest
import torch

from retain.config import ConfigError, load_config
from retain.engine import RunContext, build_run, fit_task, run
from retain.inspect import inspect_config
from retain.methods.base import mark_trainable
from retain.methods.block_expansion import TaskBlock
from retain.report import summary_rows, to_markdown, write_report

from conftest import build_with_random_weights, interrupted_then_resumed

CPU = torch.device("cpu")
SIZES = {  # two ViT sizes: (backbone, kwargs, image size)
    "dim32_depth6": ("vit_nano_patch4_32", "{depth: 6, embed_dim: 32, num_heads: 2, img_size: 16}", 16),
    "micro_dim128_depth4": ("vit_micro_patch4_32", "{}", 32),
}


def _build(tiny, size="dim32_depth6", **extra):
    """(method, the model before surgery) on a dry 2-task scenario, backbone weights random and non-zero."""
    backbone, kwargs, px = SIZES[size]
    over = {"model.backbone": backbone, "model.kwargs": kwargs, "data.image_size": str(px), "data.num_classes": "4",
            "method.name": "block_expansion", **extra}  # fmt: skip
    return build_with_random_weights(tiny(**over))


@pytest.mark.parametrize(
    "size, split, per_task",
    [("dim32_depth6", 1, False), ("dim32_depth6", 2, True), ("dim32_depth6", 4, False), ("dim32_depth6", 6, True),
     ("micro_dim128_depth4", 1, True), ("micro_dim128_depth4", 3, False), ("micro_dim128_depth4", 4, True)],
)  # fmt: skip
def test_expanded_model_computes_the_original_function(tiny, size, split, per_task):
    protocol = "task_il" if per_task else "class_il"
    method, reference = _build(tiny, size, **{"method.split": str(split), "scenario.protocol": protocol})
    depth = len(reference.backbone.blocks)
    assert len(method.model.backbone.blocks) == depth + depth // split
    x = torch.randn(3, 3, SIZES[size][2], SIZES[size][2])  # (B, 3, H, W)
    method.model.eval()
    with torch.no_grad():
        for t in (0, 1) if per_task else (0,):
            assert torch.equal(method.predict(x, t).logits, reference(x))  # max abs difference exactly 0
            assert torch.equal(method.features(x), reference.features(x))


def test_only_new_blocks_and_the_head_receive_gradients(tiny):
    method, _ = _build(tiny, **{"method.split": "3", "scenario.protocol": "task_il"})
    task = method.scenario.tasks[1]
    method.before_task(task)
    trainable = mark_trainable(method.model, method.trainable_prefixes(task))
    assert method.new_blocks == [3, 7]
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([2, 3, 2, 3])
    sum(method.loss((x, y), method.stages(task)[0]).values()).backward()
    with_grad = {n for n, p in method.model.named_parameters() if p.grad is not None}
    mine = ("backbone.blocks.3.tasks.1.", "backbone.blocks.7.tasks.1.", "head.heads.1.")
    own = {n for n, _ in method.model.named_parameters() if n.startswith(mine)}
    assert with_grad == own and sum(dict(method.model.named_parameters())[n].numel() for n in own) == trainable
    # zero-initialised output projections get gradients first; through them the rest of the block follows
    assert method.model.backbone.blocks[7].tasks[1].attn.proj.weight.grad.abs().sum() > 0


def test_task_il_keeps_each_tasks_blocks_and_routes_by_task_id(tiny):
    cfg = load_config(None, tiny(**{"method.name": "block_expansion", "scenario.protocol": "task_il",
                                    "train.lr": "0.1"}))  # fmt: skip
    scenario, method = build_run(cfg, CPU)
    ctx = RunContext(cfg.train, CPU)
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(4)])
    fit_task(method, scenario.tasks[0], ctx)
    after0 = method.predict(x, 0).logits
    blocks0 = copy.deepcopy(method.model.backbone.blocks[1].tasks[0].state_dict())
    fit_task(method, scenario.tasks[1], ctx)
    assert isinstance(method.model.backbone.blocks[1], TaskBlock) and method.task_aware_predict
    for k, v in method.model.backbone.blocks[1].tasks[0].state_dict().items():
        assert torch.equal(v, blocks0[k]), k
    assert torch.equal(method.predict(x, 0).logits[:, :2], after0[:, :2])  # task 0's blocks and head, untouched
    assert not torch.equal(
        method.predict(x, 1).logits[:, :2], after0[:, :2]
    )  # task 1's own blocks are another function
    assert method.bytes_per_task(scenario.tasks[0]) == 4 * (sum(p.numel() for p in
                                                                 method.model.backbone.blocks[1].tasks[0].parameters())
                                                            + 32 * 2 + 2)  # fmt: skip


def test_class_il_shares_one_set_of_blocks_and_per_task_is_refused(tiny):
    method, _ = _build(tiny, **{"method.split": "3"})
    assert not method.per_task and not method.task_aware_predict
    assert not any(isinstance(b, TaskBlock) for b in method.model.backbone.blocks)
    task = method.scenario.tasks[1]
    blocks = ["backbone.blocks.3.", "backbone.blocks.7."]
    assert method.trainable_prefixes(task) == [*blocks, "head.heads.1."]  # default train_mask=current
    seen, _ = _build(tiny, **{"method.split": "3", "method.train_mask": "seen"})
    assert seen.trainable_prefixes(task) == [*blocks, "head.heads.0.", "head.heads.1."]  # as finetune's default
    assert method.bytes_per_task(task) == 4 * (32 * 2 + 2)  # the shared blocks are the model, like finetune's
    with pytest.raises(ConfigError, match="per_task=true needs the task id"):
        _build(tiny, **{"method.per_task": "true"})


@pytest.mark.parametrize("split", ["0", "7"])
def test_bad_split_is_one_clear_error(tiny, split):
    with pytest.raises(ConfigError, match=r"method.split=.*split must be an int in 1\.\.6"):
        _build(tiny, **{"method.split": split})


# ------------------------------------------------------------------------------------------------ prefix cache


def _trained(tiny, cache, augment="none", split="2", cap="2.0", dtype="float32"):
    over = {"method.name": "block_expansion", "method.split": split, "method.cache_prefix": cache,
            "method.cache_max_gb": cap, "method.cache_dtype": dtype,
            "data.augment": augment, "model.kwargs": "{depth: 4, embed_dim: 32, num_heads: 2, img_size: 16}",
            "scenario.protocol": "task_il", "train.epochs": "2", "train.lr": "0.05"}  # fmt: skip
    cfg = load_config(None, tiny(**over))
    torch.manual_seed(0)
    scenario, method = build_run(cfg, CPU)
    ctx = RunContext(cfg.train, CPU)
    for task in scenario.tasks:
        fit_task(method, task, ctx)
    return method


def test_prefix_cache_trains_the_same_weights_with_one_prefix_pass(tiny):
    cached, plain = _trained(tiny, "null"), _trained(tiny, "false")  # auto mode: deterministic transform -> cached
    assert cached.prefix_cached == [0, 1] and plain.prefix_cached == []
    assert cached.first_trainable == 2
    state, ref = cached.model.state_dict(), plain.model.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5)
    assert plain.model.backbone.blocks[2].tasks[1].mlp.fc2.weight.abs().sum() > 0  # it did train
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(cached.predict(x, 1).logits, plain.predict(x, 1).logits, rtol=1e-4, atol=1e-5)


def test_prefix_cache_needs_a_deterministic_transform(tiny):
    assert _trained(tiny, "null", augment="crop_flip").prefix_cached == []  # auto: augmented images, not cached
    with pytest.raises(ConfigError, match="cache_prefix=true needs a deterministic"):
        _trained(tiny, "true", augment="crop_flip")


def test_prefix_cache_is_one_preallocated_tensor_equal_to_the_feature_pass(tiny):
    over = {"method.name": "block_expansion", "data.augment": "none", "train.eval_batch_size": "5",
            "model.kwargs": "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16}"}  # fmt: skip
    cfg = load_config(None, tiny(**over))
    scenario, method = build_run(cfg, CPU)  # 24 images in batches of 5: a short last batch
    task = scenario.tasks[0]
    tokens, labels = method.prefix_dataset(task).tensors
    ref_tokens, ref_labels = method.extract_features(task.train_eval, forward=method.prefix_tokens).tensors
    assert tokens.dtype == torch.float32 and torch.equal(tokens, ref_tokens) and torch.equal(labels, ref_labels)
    assert tokens.numel() * 4 == method.prefix_cache_bytes(task)


def test_cache_max_gb_caps_an_explicit_cache_and_auto_mode_skips(tiny):
    with pytest.raises(ConfigError, match=r"cache is 0\.00 GB \(float32\), over method.cache_max_gb=1e-06; raise "
                                          r"method.cache_max_gb or set method.cache_prefix=false"):  # fmt: skip
        _trained(tiny, "true", cap="1e-6")
    assert _trained(tiny, "null", cap="1e-6").prefix_cached == []  # auto mode: over the cap, trains online
    assert _trained(tiny, "true", cap="1e-3").prefix_cached == [0, 1]


def test_bfloat16_cache_halves_the_memory_and_trains_close_but_not_equal(tiny):
    bf16, fp32 = _trained(tiny, "true", dtype="bfloat16"), _trained(tiny, "true")
    task = bf16.scenario.tasks[0]
    assert bf16.prefix_cached == [0, 1] and 2 * bf16.prefix_cache_bytes(task) == fp32.prefix_cache_bytes(task)
    state, ref = bf16.model.state_dict(), fp32.model.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in ref.items())  # rounded tokens: another trajectory
    for k, v in ref.items():  # ... within bfloat16's rounding (token error ~2e-3, measured in docs/peft_vit.md)
        torch.testing.assert_close(state[k], v, rtol=0.1, atol=2e-3)
    with pytest.raises(ConfigError, match="method.cache_dtype='float16': expected one of float32, bfloat16"):
        _build(tiny, **{"method.cache_dtype": "float16"})


# ------------------------------------------------------------------------------------------------ state


@pytest.mark.parametrize("protocol", ["task_il", "class_il"])
def test_resume_gives_the_uninterrupted_result(tiny, monkeypatch, protocol):
    over = tiny(**{"method.name": "block_expansion", "scenario.protocol": protocol, "train.lr": "0.05"})
    full, resumed = interrupted_then_resumed(over, monkeypatch)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["trainable_params"] == full["trainable_params"]


def test_checkpoint_holds_heads_and_trained_blocks_only(tiny):
    cfg = load_config(None, tiny(**{"method.name": "block_expansion", "scenario.protocol": "task_il"}))
    scenario, method = build_run(cfg, CPU)
    fit_task(method, scenario.tasks[0], RunContext(cfg.train, CPU))
    keys = method.checkpoint_state().keys()
    assert keys and all(k.startswith(("head.", "backbone.blocks.1.tasks.0.")) for k in keys)


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("p, expected", [(1, 7_164_772), (2, 14_252_644), (3, 21_340_516), (4, 28_428_388)])
def test_vit_b16_trainable_counts_equal_the_papers_table(p, expected):
    with torch.device("meta"):  # the real ViT-B/16 architecture, no weights allocated
        info = inspect_config(load_config(f"peft_vit/cifar100_block_p{p}"))
    assert info["trainable_params"] == expected
    assert info["backbone_params"] == 85_798_656 + p * 7_087_872
    assert info["bytes_per_task"] == 4 * expected  # the new blocks and the head: what each new dataset needs


def test_every_peft_vit_preset_resolves_to_the_papers_recipe():
    for row in ("full", "linear", "lora_r4", "lora_r8", "lora_r16", "block_p1", "block_p2", "block_p3", "block_p4"):
        cfg = load_config(f"peft_vit/cifar100_{row}")
        t = cfg.train
        assert (t.steps, t.batch_size, t.optimizer, t.momentum, t.schedule) == (10000, 128, "sgd", 0.9, "cosine")
        assert t.warmup_steps == (100 if row == "linear" else 500)
        expected = ("half", "finetune", "vit_base_patch16_224.dino")
        assert (cfg.data.normalize, cfg.scenario.protocol, cfg.model.backbone) == expected
        assert (cfg.data.retention.k, cfg.data.retention.temperature) == (20, 0.07)


# ------------------------------------------------------------------------------------------------ protocol


def test_finetune_protocol_records_retention_before_and_after_in_metrics_and_report(tiny, tmp_path):
    retention = "{n_classes: 3, n_per_class: 8, n_test_per_class: 4, image_size: 16, seed: 7}"
    over = tiny(name="ret", **{"method.name": "block_expansion", "scenario.protocol": "finetune",
                               "data.retention.name": "synthetic", "data.retention.options": retention,
                               "data.retention.k": "5", "train.lr": "0.1"})  # fmt: skip
    rec = run(load_config(None, over), log=lambda *_: 0)
    saved = json.loads((tmp_path / "runs" / "ret" / "metrics.json").read_text())
    assert len(saved["retention_knn"]) == 2 and saved["retention_knn"] == rec["retention_knn"]
    assert len(saved["accuracy_matrix"]) == 1 and saved["n_tasks"] == 1
    row = summary_rows([tmp_path / "runs" / "ret"])[0]
    assert (row["retention_before"], row["retention_after"]) == tuple(saved["retention_knn"])
    assert "k-NN before" in to_markdown([row])
    report = write_report([tmp_path / "runs" / "ret"], tmp_path / "report").read_text()
    assert f"before training {saved['retention_knn'][0]:.1f}" in report


def test_a_backbone_without_vit_blocks_is_one_clear_error(tiny):
    over = tiny(**{"method.name": "block_expansion", "model.backbone": "cifar_resnet20", "model.kwargs": "{}"})
    with pytest.raises(ConfigError, match="needs a timm ViT backbone"):
        build_run(load_config(None, over), CPU)
