"""CODA's re-implementations of the baselines (GT-RIPL/CODA-Prompt ``models/zoo.py``; PROMPTS.md §4.6): L2P++ as
``l2p`` with ``form: prefix`` and DualPrompt-CODA as ``dualprompt`` with ``per_layer_keys`` / ``key_reduction: sum``.
Prefix form against an explicit forward, the key-loss variants by hand, per-block selection on hand-made keys, the
defaults unchanged, the presets and their trainable counts (PROMPTS.md §5.1), tiny runs."""

from __future__ import annotations

import math

import pytest
import torch

from retain.config import ConfigError, load_config
from retain.engine import RunContext, build_run, fit_task
from retain.inspect import dry_method, inspect_config
from retain.methods.dualprompt import e_prefix_layout
from retain.methods.l2p import key_loss, prompt_similarity
from retain.models.prompting import prefixes

CPU = torch.device("cpu")
L2P_PP = {"method.name": "l2p", "method.form": "prefix", "method.head_input": "cls",
          "method.batchwise_prompt": "false", "method.prompt_init": "uniform_unit", "method.pool_size": "5",
          "method.prompt_length": "4", "method.top_k": "2"}  # fmt: skip
TWO_BLOCKS = "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16}"
DP_DEEP = "{depth: 6, embed_dim: 32, num_heads: 2, img_size: 16}"  # G 0-1, E 2-4, block 5 plain


def _build(tiny, **over):
    cfg = load_config(None, tiny(**over))
    torch.manual_seed(0)
    scenario, method = build_run(cfg, CPU)
    method.setup()
    return cfg, scenario, method


def _batch(task, n=4):
    return torch.stack([task.train[i][0] for i in range(n)]), torch.tensor([task.train[i][1] for i in range(n)])


# ---- L2P++: the key-loss variants by hand --------------------------------------------------------------------------
KEYS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])  # key 3 never selected
QUERIES = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cos: q0 -> (1, 0, 1/√2, -1), q1 -> (0, 1, 1/√2, 0)
IDX = torch.tensor([[0, 2], [1, 2]])
R = 1 / math.sqrt(2)


@pytest.mark.parametrize(("reduction", "value"), [
    ("mean", -(1 + R)),  # -(1/2) ((1 + r) + (1 + r)): L2P, each sample's own keys
    ("sum", 2 * (1 - R)),  # (1 - 1) + (1 - r) + (1 - 1) + (1 - r)
    # every query against every sample's keys {0, 2}, {1, 2}: q0 (0 + (1 - r)) + (1 + (1 - r)), q1 the same
    ("coda_bxb", 2 * (3 - 2 * R)),
])  # fmt: skip
def test_key_loss_variants_by_hand(reduction, value):
    keys = KEYS.clone().requires_grad_()
    loss = key_loss(QUERIES, keys, IDX, reduction)
    assert loss.item() == pytest.approx(value, rel=1e-6)
    loss.backward()
    assert torch.equal(keys.grad[3], torch.zeros(2))  # unselected


def test_mean_is_the_default_and_the_bxb_bug_pulls_other_samples_keys():
    assert torch.equal(key_loss(QUERIES, KEYS, IDX), key_loss(QUERIES, KEYS, IDX, "mean"))
    idx = torch.tensor([[0], [1]])  # q0 is parallel to key 0, q1 to key 1: own keys get no pull
    own, bug = (KEYS.clone().requires_grad_() for _ in range(2))
    key_loss(QUERIES, own, idx, "sum").backward()
    key_loss(QUERIES, bug, idx, "coda_bxb").backward()
    assert own.grad[:2].abs().sum() == 0 and bug.grad[:2].abs().sum() > 0  # q1 pulls key 0, q0 key 1
    with pytest.raises(ValueError, match="reduction"):
        key_loss(QUERIES, KEYS, IDX, "max")


# ---- L2P++: the prefix form on a tiny ViT --------------------------------------------------------------------------
def _hand_forward(vit, x, pk, pv):
    """The 1-block ViT written out: [p_k; K], [p_v; V] in block 0's attention, CLS after norm and fc_norm."""
    h = vit._pos_embed(vit.patch_embed(x))  # (B, 1 + N, D)
    blk = vit.blocks[0]
    base = blk.attn.base_layer
    B, N, D = h.shape
    H, d = base.num_heads, D // base.num_heads
    q, k, v = base.qkv(blk.norm1(h)).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, L + N, d)
    a = ((q @ k.transpose(-2, -1)) / math.sqrt(d)).softmax(-1) @ v  # (B, H, N, d)
    h = h + blk.ls1(base.proj(a.transpose(1, 2).reshape(B, N, D)))
    h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return vit.fc_norm(vit.norm(h)[:, 0])  # (B, D)


def test_prefix_form_equals_an_explicit_computation(tiny):
    _, scenario, method = _build(tiny, **L2P_PP)
    model, vit = method.model, method.model.backbone
    assert model.l2p_prompts.shape == (1, 5, 4, 32) and model.l2p_keys.shape == (1, 5, 32)
    assert 0 <= model.l2p_prompts.min() and model.l2p_prompts.max() < 1  # U[0, 1)
    method.before_task(scenario.tasks[0])
    x, _ = _batch(scenario.tasks[0])
    with torch.no_grad():
        query = vit.forward_features(x)[:, 0]  # the plain model's CLS after the final norm
        idx = method.select(x, cache=False)  # (1, B, N)
        assert torch.equal(idx[0], prompt_similarity(query, model.l2p_keys[0]).topk(2, dim=1).indices)
        # by hand: sample b's key prefix = the first L/2 = 2 rows of each selected prompt in turn, value = the last 2
        rows = [[model.l2p_prompts[0, i] for i in idx[0, b]] for b in range(len(x))]
        pk = torch.stack([torch.cat([p[:2] for p in r]) for r in rows])  # (B, N L/2 = 4, D)
        pv = torch.stack([torch.cat([p[2:] for p in r]) for r in rows])
        pk, pv = (t.view(len(x), 4, 2, 16).transpose(1, 2) for t in (pk, pv))  # (B, H, 4, d)
        got_k, got_v = method.prefix(0, idx[0])
        assert torch.equal(got_k, pk) and torch.equal(got_v, pv)
        feats = method.prompted(x, idx)
        torch.testing.assert_close(feats, _hand_forward(vit, x, pk, pv), atol=1e-5, rtol=0)
        with prefixes(vit, {0: (pk, pv)}):
            assert torch.equal(feats, model.features(x))
        assert not torch.allclose(feats, model.features(x))  # the prefix matters; none is left set
        pred = method.predict(x)
    assert pred.logits.shape == (len(x), scenario.num_classes) and pred.task_ids is None


def test_deep_prefix_blocks_select_independently_on_hand_made_keys(tiny):
    over = {"model.kwargs": TWO_BLOCKS, "method.blocks": "[0, 1]", "method.top_k": "1", "method.pool_size": "3"}
    _, scenario, method = _build(tiny, **(L2P_PP | over))
    model = method.model
    D = model.l2p_keys.shape[-1]
    keys = torch.zeros(2, 3, D)
    keys[0, :, 0], keys[0, :, 1] = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])  # e0, e1, -e0
    keys[1, :, 0], keys[1, :, 1] = torch.tensor([0.0, -1.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])  # e1, -e0, e0
    queries = torch.zeros(3, D)
    queries[:, 0], queries[:, 1] = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.0])  # e0, e1, -e0
    with torch.no_grad():
        model.l2p_keys.copy_(keys)
    method.query = lambda x, cache=True: queries
    method.before_task(scenario.tasks[0])
    x, y = _batch(scenario.tasks[0], 3)
    idx = method.select(x)
    assert idx.shape == (2, 3, 1) and idx[..., 0].tolist() == [[0, 1, 2], [2, 0, 1]]
    seen = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, m.prefix))
             for i, blk in enumerate(model.backbone.blocks)]  # fmt: skip
    with torch.no_grad():
        method.prompted(x, idx)
    for h in hooks:
        h.remove()
    for block in (0, 1):  # each block gets its own pool's prompt, the one its own keys chose
        p = model.l2p_prompts[block][idx[block, :, 0]]  # (B, L, D)
        assert torch.equal(seen[block][0], p[:, :2].view(3, 2, 2, 16).transpose(1, 2))
    terms = method.loss((x, y), None)
    by_hand = sum(key_loss(queries, keys[b], idx[b], "mean") for b in (0, 1))  # 2 x -(1/3)(1 + 1 + 1)
    assert terms["key"].item() == pytest.approx(0.1 * by_hand.item()) == pytest.approx(-0.2)
    assert method.selection_counts.tolist() == [[1, 1, 1], [1, 1, 1]]  # one histogram per block
    assert len(method.task_record(scenario.tasks[0])["prompt_selection_train"]) == 2


@pytest.mark.parametrize(("key", "value", "message"), [
    ("method.head_input", "prompt", "method.head_input='prompt'; method.form=prefix"),
    ("method.prompt_length", "5", "method.prompt_length=5; method.form=prefix needs it even"),
    ("method.blocks", "[0, 3]", "method.blocks=[0, 3]; distinct block indices in 0..0"),
    ("method.key_reduction", "max", "method.key_reduction='max'"),
    ("method.form", "suffix", "method.form='suffix'"),
])  # fmt: skip
def test_prefix_form_config_errors(tiny, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _build(tiny, **{**L2P_PP, key: value})


def test_blocks_only_in_prefix_form(tiny):
    with pytest.raises(ConfigError, match="only with method.form=prefix"):
        _build(tiny, **{"method.name": "l2p", "method.blocks": "[0]"})


def test_prefix_form_two_task_run(tiny):
    over = {"train.epochs": "2", "train.optimizer": "adam", "train.lr": "0.01", "method.key_reduction": "coda_bxb"}
    cfg, scenario, method = _build(tiny, **(L2P_PP | over))
    backbone = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    prompts = method.model.l2p_prompts.detach().clone()
    ctx = RunContext(cfg.train, CPU)
    records = []
    for task in scenario.tasks:
        fit_task(method, task, ctx)
        records.append(method.task_record(task)["prompt_selection_train"])
    rows = [r for r in ctx.history if "ce" in r]
    assert rows and all(math.isfinite(r["ce"]) and math.isfinite(r["key"]) and r["key"] >= 0 for r in rows)
    for k, v in method.model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert not torch.equal(method.model.l2p_prompts, prompts)
    # per-sample: N = 2 ids x 24 images (2 classes x 12) x 2 epochs per task, one count per pool prompt
    assert [len(r) for r in records] == [5, 5] and [sum(r) for r in records] == [2 * 24 * 2] * 2


# ---- DualPrompt-CODA -----------------------------------------------------------------------------------------------
DP = {"method.name": "dualprompt", "model.kwargs": DP_DEEP, "method.pool_size": "3"}


def test_per_layer_keys_select_independently_on_hand_made_keys(tiny):
    _, scenario, method = _build(tiny, **DP, **{"method.per_layer_keys": "true", "method.batchwise_prompt": "false"})
    model = method.model
    D = model.dp_keys.shape[-1]
    assert model.dp_keys.shape == (3, 3, D)  # (M, E, D): slot t holds task t's key of every E block
    keys = torch.zeros(3, 3, D)
    for j, order in enumerate(([0, 1, 2], [1, 2, 0], [2, 0, 1])):  # block j: slot order[m] has key e_m
        for m, slot in enumerate(order):
            keys[slot, j, m] = 1.0
    queries = torch.eye(D)[[0, 1, 2, 0]] * torch.tensor([[2.0], [1.0], [0.5], [1.0]])
    with torch.no_grad():
        model.dp_keys.copy_(keys)
    method.query = lambda x, cache=True: queries
    method.before_task(scenario.tasks[1])
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(4)])
    ids = method.select(x)
    assert ids.tolist() == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]  # (E, B): each block by its own keys
    with torch.no_grad():  # slot s's key half of block j: 10 s + j, value half 10 s + j + 0.5
        for s in range(3):
            for j in range(3):
                model.dp_e_prompts[s, j, 0], model.dp_e_prompts[s, j, 1] = 10.0 * s + j, 10.0 * s + j + 0.5
    pm = method.prefix_map(ids)
    for j, block in enumerate((2, 3, 4)):
        assert [pm[block][0][b].unique().item() for b in range(4)] == [10.0 * s + j for s in ids[j].tolist()]
        assert [pm[block][1][b].unique().item() for b in range(4)] == [10.0 * s + j + 0.5 for s in ids[j].tolist()]
    pred = method.predict(x)
    assert pred.task_ids.tolist() == [0, 0, 0, 0]  # one vote per block each: the lowest slot
    method.cfg.batchwise_prompt = True  # the vote runs per block
    assert method.select(x).tolist() == [[0] * 4, [1] * 4, [2] * 4]


def test_per_layer_prefix_map_equals_gathering_by_hand(tiny):
    _, _, method = _build(tiny, **DP, **{"method.per_layer_keys": "true"})
    ids = torch.tensor([[0, 2], [1, 1], [2, 0]])  # (E, B)
    e = method.model.dp_e_prompts
    by_hand = torch.stack([torch.stack([e[ids[j, b], j] for j in range(3)]) for b in range(2)])  # (B, E, 2, L, H, d)
    want = e_prefix_layout(by_hand, "correct")
    pm = method.prefix_map(ids)
    for j, block in enumerate((2, 3, 4)):
        assert torch.equal(pm[block][0], want[j][:, 0].permute(0, 2, 1, 3))


def test_key_reduction_sum_by_hand(tiny):
    _, scenario, method = _build(tiny, **DP, **{"method.per_layer_keys": "true", "method.key_reduction": "sum"})
    D = method.model.dp_keys.shape[-1]
    q = torch.zeros(3, D)
    q[0, 0], q[1, 0], q[1, 1], q[2, 1] = 1.0, 1.0, 1.0, 1.0  # e0, (e0 + e1)/√2, e1
    with torch.no_grad():
        method.model.dp_keys.zero_()
        method.model.dp_keys[1, 0, 0] = 2.0  # block 2: e0 -> cos 1, 1/√2, 0
        method.model.dp_keys[1, 1, 1] = 3.0  # block 3: e1 -> cos 0, 1/√2, 1
        method.model.dp_keys[1, 2, 0] = -1.0  # block 4: -e0 -> cos -1, -1/√2, 0
    method.query = lambda x, cache=True: q
    method.before_task(scenario.tasks[1])
    x, y = torch.stack([scenario.tasks[1].test[i][0] for i in range(3)]), torch.full((3,), scenario.tasks[1].offset)
    terms = method.loss((x, y), None)
    by_hand = (3 - 1 - R) + (3 - R - 1) + (3 + 1 + R)  # Σ_layers Σ_b (1 - cos)
    assert terms["key"].item() == pytest.approx(by_hand, rel=1e-6)
    terms["key"].backward()
    grad = method.model.dp_keys.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0  # only slot t


def test_per_layer_keys_equal_to_the_shared_key_give_the_default_method(tiny):
    """The default (one key set) is unchanged; per-layer keys that are copies of it select and predict the same."""
    _, scenario, shared = _build(tiny, **DP, **{"method.batchwise_prompt": "false"})
    _, _, layered = _build(tiny, **DP, **{"method.batchwise_prompt": "false", "method.per_layer_keys": "true"})
    assert shared.model.dp_keys.shape == (3, 32)
    with torch.no_grad():
        layered.model.load_state_dict(shared.model.state_dict() | {
            "dp_keys": shared.model.dp_keys[:, None].expand(3, 3, 32).clone()})  # fmt: skip
    x = torch.stack([scenario.tasks[1].test[i][0] for i in range(4)])
    for m in (shared, layered):
        m.before_task(scenario.tasks[1])
    ids = shared.select(x)
    assert ids.shape == (4,) and torch.equal(layered.select(x), ids.expand(3, 4))
    a, b = shared.predict(x), layered.predict(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.task_ids, b.task_ids)
    xb, yb = _batch(scenario.tasks[1])
    ta, tb = shared.loss((xb, yb), None), layered.loss((xb, yb), None)
    assert torch.equal(ta["ce"], tb["ce"])
    torch.testing.assert_close(tb["key"], 3 * ta["key"])  # -mean_b Σ_layers cos: three equal layers


def test_dualprompt_coda_two_task_run(tiny):
    cfg, scenario, method = _build(tiny, **DP, **{"method.per_layer_keys": "true", "method.key_reduction": "sum",
                                                  "method.prompt_init": "coda", "method.shared_prompt_pool": "false",
                                                  "method.batchwise_prompt": "false", "train.optimizer": "adam",
                                                  "train.lr": "0.01"})  # fmt: skip
    e0 = method.model.dp_e_prompts.detach().clone()
    assert 0 <= e0.min() and e0.max() < 1
    ctx = RunContext(cfg.train, CPU)
    for task in scenario.tasks:
        fit_task(method, task, ctx)
    rows = [r for r in ctx.history if "ce" in r]
    assert rows and all(math.isfinite(r["ce"]) and math.isfinite(r["key"]) for r in rows)
    keys = method.model.dp_keys
    assert torch.equal(method.model.dp_e_prompts[2], e0[2])  # slot 2 has no task: untouched, no copy
    pred = method.predict(torch.stack([scenario.tasks[1].test[i][0] for i in range(4)]))
    assert pred.task_ids.shape == (4,) and keys.shape[:2] == (3, 3)


# ---- presets and counts --------------------------------------------------------------------------------------------
L2P_PP_PRESETS = {"prompts/cifar100_l2p_pp": (10, 20), "prompts/imagenet_r_l2p_pp": (20, 50)}
DP_CODA_PRESETS = {"prompts/cifar100_dualprompt_coda": (10, 20), "prompts/imagenet_r_dualprompt_coda": (20, 50)}


def _protocol(cfg, epochs):
    assert cfg.model.backbone == "vit_base_patch16_224.augreg_in21k_ft_in1k" and cfg.seed == 0
    assert cfg.data.normalize == "none" and tuple(cfg.data.rrc_scale) == (0.08, 1.0) and cfg.scenario.n_tasks == 10
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.schedule) == ("adam", 0.001, "cosine")
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.amp) == (128, epochs, False)


@pytest.mark.parametrize("preset", list(L2P_PP_PRESETS))
def test_l2p_pp_presets_load(preset):
    cfg = load_config(preset)
    _protocol(cfg, L2P_PP_PRESETS[preset][1])
    m = cfg.method
    assert (m.name, m.form, m.blocks, m.pool_size, m.prompt_length, m.top_k) == ("l2p", "prefix", [0], 30, 20, 5)
    assert (m.key_weight, m.key_reduction, m.batchwise_prompt) == (1.0, "sum", False)
    assert (m.prompt_init, m.head_input) == ("uniform_unit", "cls")


@pytest.mark.parametrize("preset", list(DP_CODA_PRESETS))
def test_dualprompt_coda_presets_load(preset):
    cfg = load_config(preset)
    _protocol(cfg, DP_CODA_PRESETS[preset][1])
    m = cfg.method
    assert (m.name, m.g_blocks, m.g_length, m.e_blocks, m.e_length) == ("dualprompt", [0, 1], 3, [2, 3, 4], 10)
    assert (m.pool_size, m.top_k, m.per_layer_keys, m.key_reduction, m.key_weight) == (10, 1, True, "sum", 1.0)
    assert (m.batchwise_prompt, m.prompt_init, m.shared_prompt_pool, m.prefix_layout) == (False, "coda", False,
                                                                                          "correct")  # fmt: skip


def _counts(preset, overrides=()):
    """(trainable values of one task as ``retain inspect`` counts them, trained values over the run), on meta."""
    with torch.device("meta"):  # the real ViT-B/16, no weights allocated
        info = inspect_config(load_config(preset, list(overrides)))
        scenario, method = dry_method(load_config(preset, list(overrides)))
    assert info["trainable_params"] == info["trainable_params_last_task"]
    params = dict(method.model.named_parameters())
    names = {n for t in scenario.tasks for n in method.trained_names(t)}
    return info["trainable_params"], sum(params[n].numel() for n in names)


@pytest.mark.parametrize(("preset", "deep", "prompt_key", "total"), [
    ("prompts/cifar100_l2p_pp", False, 483_840, 560_740),
    ("prompts/imagenet_r_l2p_pp", False, 483_840, 637_640),
    ("prompts/cifar100_l2p_pp", True, 2_419_200, 2_496_100),
    ("prompts/imagenet_r_l2p_pp", True, 2_419_200, 2_573_000),
])  # fmt: skip
def test_l2p_pp_trainable_counts_equal_the_spec(preset, deep, prompt_key, total):
    """PROMPTS.md §5.1: L2P++ 30·20·768 + 30·768 (Deep: x5 blocks) + the 100- / 200-class head over the run."""
    classes = L2P_PP_PRESETS[preset][0]
    assert 30 * 20 * 768 + 30 * 768 == 483_840 and 5 * 483_840 == 2_419_200
    one_task, run = _counts(preset, ["method.blocks=[0,1,2,3,4]"] if deep else [])
    assert one_task == prompt_key + 768 * classes + classes and run == total


@pytest.mark.parametrize(("preset", "total"), [("prompts/cifar100_dualprompt_coda", 569_956),
                                               ("prompts/imagenet_r_dualprompt_coda", 646_856)])  # fmt: skip
def test_dualprompt_coda_trainable_counts_equal_the_spec(preset, total):
    """PROMPTS.md §5.1: G 2x6x768 + E 3x10x20x768 + 3x10 keys x768 = 493,056, + the 100- / 200-class head."""
    g, e, keys = 2 * 6 * 768, 3 * 10 * 20 * 768, 3 * 10 * 768
    assert (g, e, keys, g + e + keys) == (9_216, 460_800, 23_040, 493_056)
    classes = DP_CODA_PRESETS[preset][0]
    one_task, run = _counts(preset)
    assert one_task == 493_056 + 768 * classes + classes and run == total
