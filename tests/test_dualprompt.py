"""DualPrompt (Wang et al., ECCV 2022; PROMPTS.md §3): prefix layout (correct vs DP-pt's reshape bug), where the
G- and E-prompts enter, test-time selection, key loss, the shared-pool copy, the presets' parameter counts, a tiny
run."""

import math
import warnings

import pytest
import torch

from retain.config import ConfigError, load_config
from retain.engine import RunContext, build_run, fit_task
from retain.inspect import inspect_config
from retain.methods.dualprompt import e_prefix_layout, select_prompts
from retain.models.prompting import prefixes
from retain.models.query import key_similarity as similarity

CPU = torch.device("cpu")
DEEP = "{depth: 6, embed_dim: 32, num_heads: 2, img_size: 16}"  # blocks 0-4 prompted, block 5 plain


def _method(tiny, **extra):
    cfg = load_config(None, tiny(**{"method.name": "dualprompt", "model.kwargs": DEEP, **extra}))
    torch.manual_seed(0)  # the same random "pre-trained" backbone in every call
    scenario, method = build_run(cfg, CPU)
    method.setup()
    return cfg, scenario, method


def _images(scenario, n=4, task=0):
    return torch.stack([scenario.tasks[task].test[i][0] for i in range(n)])


# ------------------------------------------------------------------------------------------------ prefix layout
def _encoded(B=4):
    """(B, E=1, 2, L=1, H=1, d=1) E-prompts whose value names them: 10 * sample + kv (kv 0 = key, 1 = value)."""
    return torch.tensor([[10.0 * b, 10.0 * b + 1] for b in range(B)]).view(B, 1, 2, 1, 1, 1)


def test_correct_layout_gives_each_sample_its_own_key_and_value():
    out = e_prefix_layout(_encoded(), "correct")[0].flatten(1)  # (B, 2)
    assert out.tolist() == [[0, 1], [10, 11], [20, 21], [30, 31]]


def test_dp_pt_bug_mixes_the_kv_and_batch_axes_as_by_hand():
    """DP-pt reshapes (kv, B) to (B, kv): sample b gets rows 2b, 2b+1 of [k0 k1 k2 k3 v0 v1 v2 v3] (PROMPTS.md §3.7):
    the first half of the batch gets two keys, the second half two values, mostly of other samples."""
    out = e_prefix_layout(_encoded(), "dp_pt_bug")[0].flatten(1)  # (B, 2) = (key prefix, value prefix)
    by_hand = [[0, 10], [20, 30], [1, 11], [21, 31]]  # (k0, k1), (k2, k3), (v0, v1), (v2, v3)
    assert out.tolist() == by_hand


def test_the_method_hands_blocks_the_layout_it_is_configured_with(tiny):
    """Four samples routed to four slots; block 2's (p_k, p_v) per sample, through ``prefix_map``."""
    for layout, expect in (("correct", [[0, 1], [10, 11], [20, 21], [30, 31]]),
                           ("dp_pt_bug", [[0, 10], [20, 30], [1, 11], [21, 31]])):  # fmt: skip
        _, _, method = _method(tiny, **{"method.pool_size": "4", "method.prefix_layout": layout})
        with torch.no_grad():
            for slot in range(4):  # every value of slot s's key half 10 s, of its value half 10 s + 1
                method.model.dp_e_prompts[slot, :, 0] = 10.0 * slot
                method.model.dp_e_prompts[slot, :, 1] = 10.0 * slot + 1
        p_k, p_v = method.prefix_map(torch.arange(4))[2]  # (B, H, L, d) each
        assert [[p_k[b].unique().item(), p_v[b].unique().item()] for b in range(4)] == expect


# ------------------------------------------------------------------------------------------- where prompts enter
def test_g_prefixes_go_to_blocks_0_1_and_e_prefixes_to_blocks_2_3_4(tiny):
    _, scenario, method = _method(tiny)
    vit, model = method.model.backbone, method.model
    seen = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, getattr(m, "prefix", None)))
             for i, blk in enumerate(vit.blocks)]  # fmt: skip
    ids = torch.tensor([1, 0, 1, 1])
    x = _images(scenario)
    with torch.no_grad():
        got = method.prompted_features(x, ids)
    for h in hooks:
        h.remove()
    g, e = model.dp_g_prompts, model.dp_e_prompts  # (G, 2, L, H, d), (M, E, 2, L, H, d)
    for i in (0, 1):  # the task-shared G-prompt of block i, (1, H, L, d) broadcast to the batch
        assert torch.equal(seen[i][0], g[i, 0].permute(1, 0, 2).expand(4, -1, -1, -1))
        assert torch.equal(seen[i][1], g[i, 1].permute(1, 0, 2).expand(4, -1, -1, -1))
    for j, i in enumerate((2, 3, 4)):  # each sample's own slot
        assert torch.equal(seen[i][0], e[ids, j, 0].permute(0, 2, 1, 3))
        assert torch.equal(seen[i][1], e[ids, j, 1].permute(0, 2, 1, 3))
    assert seen[5] is None and model.dp_g_prompts.shape[2] == 5 and model.dp_e_prompts.shape[3] == 5
    hand = {i: (g[i, 0].permute(1, 0, 2)[None], g[i, 1].permute(1, 0, 2)[None]) for i in (0, 1)}
    hand |= {i: (e[ids, j, 0].permute(0, 2, 1, 3), e[ids, j, 1].permute(0, 2, 1, 3)) for j, i in enumerate((2, 3, 4))}
    with torch.no_grad(), prefixes(vit, hand):
        explicit = model.features(x)
    assert torch.equal(got, explicit)
    assert not torch.equal(got, model.features(x))  # the prompts change the features; none are left set


# ------------------------------------------------------------------------------------------- selection and loss
def test_selection_by_hand_per_sample_and_batchwise():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.1, 0.7, 0.6], [0.0, 0.1, 0.5]])
    assert select_prompts(sim, batchwise=False).tolist() == [0, 1, 1, 2]
    assert select_prompts(sim, batchwise=True).tolist() == [1, 1, 1, 1]  # slot 1 wins 2 of 4 votes
    tie = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert select_prompts(tie, batchwise=True).tolist() == [0, 0]  # one vote each: the lowest slot


def test_method_selects_the_key_most_cosine_similar_to_the_frozen_query(tiny):
    _, scenario, method = _method(tiny, **{"method.batchwise_prompt": "false"})
    D = method.model.dp_keys.shape[1]
    keys, queries = torch.zeros(2, D), torch.zeros(4, D)
    keys[0, 0], keys[1, 1] = 3.0, 0.5  # norms differ: cosine, not dot product
    queries[:, 0] = torch.tensor([1.0, 0.2, 2.0, -1.0])
    queries[:, 1] = torch.tensor([0.5, 1.0, 1.9, 0.0])
    with torch.no_grad():
        method.model.dp_keys.copy_(keys)
    method.query = lambda x, cache=True: queries
    method.before_task(scenario.tasks[1])
    assert method.select(_images(scenario)).tolist() == [0, 1, 0, 1]  # -e0: cos -1 with key 0, 0 with key 1
    method.cfg.batchwise_prompt = True
    assert method.select(_images(scenario)).tolist() == [0, 0, 0, 0]  # 2 votes each: the lowest
    pred = method.predict(_images(scenario))
    assert pred.task_ids.tolist() == [0, 0, 0, 0] and pred.logits.shape == (4, scenario.num_classes)
    assert method.predict(_images(scenario), task_id=1).task_ids.tolist() == [1, 1, 1, 1]  # task-IL: the oracle


def test_key_loss_by_hand(tiny):
    _, scenario, method = _method(tiny, **{"method.key_weight": "0.5"})
    D = method.model.dp_keys.shape[1]
    q = torch.zeros(3, D)
    q[0, 0], q[1, 0], q[1, 1], q[2, 0] = 1.0, 1.0, 1.0, -2.0  # cos with e0: 1, 1/sqrt(2), -1
    with torch.no_grad():
        method.model.dp_keys[1] = 0.0
        method.model.dp_keys[1, 0] = 4.0
    method.query = lambda x, cache=True: q
    method.before_task(scenario.tasks[1])
    x, y = _images(scenario, 3, task=1), torch.full((3,), scenario.tasks[1].offset)
    terms = method.loss((x, y), None)
    assert terms["key"].item() == pytest.approx(-0.5 * (1 + 1 / math.sqrt(2) - 1) / 3, abs=1e-6)
    assert torch.allclose(similarity(q, method.model.dp_keys)[:, 1], torch.tensor([1, 1 / math.sqrt(2), -1]))
    terms["key"].backward()
    grad = method.model.dp_keys.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0  # only key t moves


# ---------------------------------------------------------------------------------------------- task boundaries
@pytest.mark.parametrize("shared", [True, False])
def test_shared_pool_copies_e_prompt_t_minus_1_into_slot_t_not_the_key(tiny, shared):
    _, scenario, method = _method(tiny, **{"method.shared_prompt_pool": str(shared).lower()})
    e, k = method.model.dp_e_prompts, method.model.dp_keys
    before_e, before_k = e.detach().clone(), k.detach().clone()
    method.before_task(scenario.tasks[0])
    assert torch.equal(e, before_e)  # task 0: nothing to copy
    method.before_task(scenario.tasks[1])
    assert torch.equal(e[1], before_e[0]) == shared and not torch.equal(before_e[1], before_e[0])
    assert torch.equal(e[0], before_e[0]) and torch.equal(k, before_k)


# ------------------------------------------------------------------------------------------------------ counts
def test_preset_trainable_counts_equal_the_spec():
    """PROMPTS.md §5.1, DP-pt: G 2x2x5x768 + E 3x2x10x5x768 (20 on ImageNet-R) + 10 keys + head. The library's head
    is one Linear per task, of which task t trains its own, so a task trains the prompts + keys and 1/10 of the
    spec's 100-class (200-class) head."""
    cifar = inspect_config(load_config("prompts/cifar100_dualprompt"))
    g, e, keys, head = 2 * 2 * 5 * 768, 3 * 2 * 10 * 5 * 768, 10 * 768, 768 * 10 + 10
    assert (g, e, keys) == (15_360, 230_400, 7_680) and g + e + keys + 10 * head == 330_340
    assert cifar["trainable_params"] == cifar["trainable_params_last_task"] == g + e + keys + head
    assert cifar["bytes_per_task"] == 4 * (3 * 2 * 5 * 768 + 768 + head)  # slot t of E and keys, head t
    imr = inspect_config(load_config("prompts/imagenet_r_dualprompt"))
    e20, head20 = 3 * 2 * 10 * 20 * 768, 768 * 20 + 20
    assert g + e20 + keys + 10 * head20 == 1_098_440 and imr["trainable_params"] == g + e20 + keys + head20


def test_presets_load_the_dp_pt_protocol():
    cifar, imr = load_config("prompts/cifar100_dualprompt"), load_config("prompts/imagenet_r_dualprompt")
    assert cifar.method.batchwise_prompt and not imr.method.batchwise_prompt
    assert (cifar.method.e_length, imr.method.e_length) == (5, 20)
    assert (cifar.train.lr, imr.train.lr) == (0.03 * 24 / 256, 0.005 * 24 / 256)
    assert (cifar.train.epochs, imr.train.epochs) == (5, 50) and cifar.train.grad_clip == 1.0
    assert cifar.model.backbone == imr.model.backbone == "vit_base_patch16_224.orig_in21k"


# ------------------------------------------------------------------------------------------------- config, runs
@pytest.mark.parametrize(("key", "value", "message"), [
    ("prefix_layout", "buggy", "method.prefix_layout='buggy'; valid: correct, dp_pt_bug"),
    ("prompt_init", "zeros", "method.prompt_init='zeros'; valid: dp_pt, jax"),
    ("top_k", "2", "method.top_k=2; only 1"),
    ("pool_size", "1", "method.pool_size=1 < 2 tasks"),
    ("e_blocks", "[1, 2]", "distinct block indices"),
])  # fmt: skip
def test_bad_values_are_one_line_config_errors(tiny, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _method(tiny, **{f"method.{key}": value})


def test_jax_init_and_a_shallow_backbone_fold_blocks_with_one_warning(tiny):
    _, _, method = _method(tiny, **{"method.prompt_init": "jax"})
    e = method.model.dp_e_prompts
    assert e.min() >= 0 and e.max() < 0.01
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, shallow = _method(tiny, **{"model.kwargs": "{depth: 1, embed_dim: 32, num_heads: 2, img_size: 16}"})
    assert len(caught) == 1 and "G blocks [0, 1] -> [0], E blocks [2, 3, 4] -> [0]" in str(caught[0].message)
    p_k, _ = shallow.prefix_map(torch.tensor([0, 1]))[0]
    assert p_k.shape[2] == 5 + 5  # block 0 gets [G; E]


def test_tiny_two_task_run_trains_prompts_and_leaves_the_backbone_bit_identical(tiny):
    cfg, scenario, method = _method(tiny, **{"train.epochs": "2", "train.optimizer": "adam", "train.lr": "0.01",
                                             "train.grad_clip": "1.0"})  # fmt: skip
    backbone = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    losses, real_loss = [], method.loss
    method.loss = lambda batch, stage: losses.append(terms := real_loss(batch, stage)) or terms
    ctx, model = RunContext(cfg.train, CPU), method.model
    rows = []
    for task in scenario.tasks:
        before = {k: v.detach().clone() for k, v in method.checkpoint_state().items()}
        fit_task(method, task, ctx)
        rows.append((before, {k: v.detach().clone() for k, v in method.checkpoint_state().items()}))
    assert losses and all(torch.isfinite(v).all() for terms in losses for v in terms.values())
    assert {"ce", "key"} <= losses[0].keys()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    (b0, a0), (b1, a1) = rows
    assert not torch.equal(a0["dp_g_prompts"], b0["dp_g_prompts"])  # G trains in every task
    assert not torch.equal(a1["dp_g_prompts"], b1["dp_g_prompts"])
    for name in ("dp_e_prompts", "dp_keys"):  # slot t moves in task t only
        assert not torch.equal(a0[name][0], b0[name][0]) and torch.equal(a0[name][1], b0[name][1]), name
        assert not torch.equal(a1[name][1], a0[name][1]) and torch.equal(a1[name][0], a0[name][0]), name
    model.eval()
    pred = method.predict(_images(scenario, task=1))
    assert torch.isfinite(pred.logits[:, : scenario.num_classes]).all() and pred.task_ids.shape == (4,)
    assert torch.isfinite(method.features(_images(scenario))).all()
