"""The paper presets follow the official runs (issue #22): PAD's CIFAR-100 class order and patience, PEFT-ViT's
precision and learning rates, and the "Top-3" row."""

import numpy as np
import pytest
import torch

from retain.config import ConfigError, load_config
from retain.inspect import dry_build, dry_scenario, inspect_config

PAD_CIFAR = ("lwf", "finetune", "ewc", "pad_sym_att", "pad_asym_att", "pad_sym_func", "pad_asym_func")
PEFT_ROWS = ("full", "linear", "top3", "lora_r4", "lora_r8", "lora_r16", "block_p1", "block_p2", "block_p3",
             "block_p4")  # fmt: skip
BLOCK = 7_087_872  # one ViT-B/16 block
HEAD = 76_900  # a fresh 100-class head on 768 features


def facil_class_order(seed: int = 1, n_classes: int = 100) -> list[int]:
    """FACIL's order when the dataset config has no class_order: main_incremental seeds numpy with --seed, then
    memory_dataset shuffles the class list with np.random.shuffle."""
    np.random.seed(seed)
    order = list(range(n_classes))
    np.random.shuffle(order)
    return order


# ------------------------------------------------------------------------------------------------ PAD, CIFAR-100


@pytest.mark.parametrize("row", PAD_CIFAR)
def test_pad_cifar100_class_order_is_the_official_runs(row):
    order = load_config(f"pad/cifar100_{row}").scenario.class_order
    assert order[:10] == [80, 84, 33, 81, 93, 17, 36, 82, 69, 65]
    assert sorted(order) == list(range(100))
    assert order == facil_class_order(seed=1)


def test_pad_cifar100_scenario_uses_that_order():
    scenario = dry_scenario(load_config("pad/cifar100_lwf"))
    order = facil_class_order(seed=1)
    assert scenario.class_order == order
    assert scenario.classes_per_task == [50, 10, 10, 10, 10, 10]
    assert sorted(scenario.tasks[0].classes) == sorted(order[:50])  # the first task: the first 50 of the order


@pytest.mark.parametrize("row", PAD_CIFAR)
def test_pad_patience_cifar100_15_imagenet32_20(row):
    assert load_config(f"pad/cifar100_{row}").train.patience == 15  # script_cifar100.sh --lr-patience 15
    assert load_config(f"pad/imagenet32_{row}").train.patience == 20  # FACIL's default, script_imagenet.sh


# ------------------------------------------------------------------------------------------------ PEFT-ViT


@pytest.mark.parametrize("row", PEFT_ROWS)
def test_peft_vit_presets_train_in_float32_with_tf32(row):
    t = load_config(f"peft_vit/cifar100_{row}").train
    assert (t.amp, t.tf32) == (False, True)


def test_peft_vit_learning_rates_follow_the_shipped_configs():
    lrs = {row: load_config(f"peft_vit/cifar100_{row}").train.lr for row in PEFT_ROWS}
    assert lrs == {"full": 0.005, "linear": 0.005, "top3": 0.005, "lora_r4": 0.05, "lora_r8": 0.005,
                   "lora_r16": 0.05, "block_p1": 0.05, "block_p2": 0.005,  # the shipped split-6 config
                   "block_p3": 0.05, "block_p4": 0.05}  # fmt: skip


def test_top3_trains_the_last_three_blocks_and_the_head():
    with torch.device("meta"):  # the real ViT-B/16 architecture, no weights allocated
        cfg = load_config("peft_vit/cifar100_top3")
        info = inspect_config(cfg)
        scenario, method, _ = dry_build(cfg)
    assert info["trainable_params"] == info["trainable_params_last_task"] == 3 * BLOCK + HEAD == 21_340_516
    assert info["backbone_params"] == 85_798_656  # no block added
    assert info["bytes_per_task"] == 4 * 21_340_516
    names = method.trained_names(scenario.tasks[0])
    blocks = {n.split(".")[2] for n in names if n.startswith("backbone.")}
    assert blocks == {"9", "10", "11"}
    assert all(n.startswith(("backbone.blocks.", "head.")) for n in names)  # final norm, embeddings frozen


def test_trainable_blocks_default_keeps_the_whole_backbone(tiny):
    cfg = load_config(None, tiny(**{"method.name": "finetune"}))
    assert cfg.method.trainable_blocks is None
    scenario, method, _ = dry_build(cfg)
    assert method.trainable_prefixes(scenario.tasks[0]) == ["backbone.", "head.heads.0."]


def test_trainable_blocks_trains_only_the_last_blocks(tiny):
    kwargs = "{depth: 3, embed_dim: 32, num_heads: 2, img_size: 16}"
    over = tiny(**{"method.name": "finetune", "method.trainable_blocks": "2", "model.kwargs": kwargs})
    cfg = load_config(None, over)
    scenario, method, _ = dry_build(cfg)
    names = method.trained_names(scenario.tasks[1])
    assert {n.split(".")[2] for n in names if n.startswith("backbone.")} == {"1", "2"}
    assert {n.split(".")[0] for n in names} == {"backbone", "head"}
    assert not any(n.startswith(("backbone.blocks.0.", "backbone.norm", "backbone.patch_embed")) for n in names)


def test_trainable_blocks_out_of_range_is_one_clear_error(tiny):
    cfg = load_config(None, tiny(**{"method.name": "finetune", "method.trainable_blocks": "99"}))
    with pytest.raises(ConfigError, match="method.trainable_blocks=99"):
        dry_build(cfg)
