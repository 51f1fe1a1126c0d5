"""L2P (retain.methods.l2p, PROMPTS.md §2): selection and vote by hand (§10.3), the key loss, prompts entering only
through the prompt-tuning seam, the trainable counts of §5.1, the presets, a tiny 2-task run and its artefact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import retain
from retain.config import ConfigError, load_config
from retain.engine import RunContext, build_run, fit_task, train
from retain.inspect import dry_method, inspect_config
from retain.methods import l2p as l2p_module
from retain.methods.base import mark_trainable
from retain.methods.l2p import COUNTS, batch_vote, key_loss, l2_normalize, prompt_similarity, select_prompts
from retain.models.prompting import prompt_token_mean, prompted_features

from conftest import torchrun_worker

CPU = torch.device("cpu")
PRESETS = ["prompts/cifar100_l2p", "prompts/cifar100_l2p_jax"]


# ---- selection and vote --------------------------------------------------------------------------------------------
SIM = torch.tensor([[0.9, 0.8, 0.1, 0.0, -0.5],  # top-2: 0, 1
                    [0.1, 0.7, 0.9, 0.0, 0.2],  # top-2: 2, 1
                    [0.2, 0.95, 0.3, 0.1, 0.8]])  # top-2: 1, 4  # fmt: skip


def test_per_sample_top_n_by_hand():
    assert select_prompts(SIM, 2, batchwise=False).tolist() == [[0, 1], [2, 1], [1, 4]]


def test_batchwise_vote_takes_the_most_frequent_ids_for_every_sample():
    # counts: 1 -> 3, then 0, 2, 4 -> 1 each (tie: the lower id); id 3 absent, so the padding path runs (4 < M = 5)
    # with a padded id of count 0 that cannot win
    assert select_prompts(SIM, 2, batchwise=True).tolist() == [[1, 0]] * 3


def test_vote_without_padding_breaks_ties_by_lower_id():
    idx = torch.tensor([[0, 1], [2, 1], [2, 0]])  # every id of the pool (M = 3) twice
    assert batch_vote(idx, pool_size=3).tolist() == [[0, 1]] * 3


def test_vote_pads_with_the_smallest_id_when_fewer_distinct_ids_than_n():
    # a hand-made selection with 2 distinct ids for N = 3 (a real top-N never has fewer than N): padded ids are
    # min(idx) = 2 at count 0, so the third slot repeats id 2, as the official code
    idx = torch.tensor([[4, 2, 4], [4, 4, 2]])
    assert batch_vote(idx, pool_size=6).tolist() == [[4, 2, 2]] * 2


def test_similarity_is_cosine_and_the_zero_vector_is_safe():
    q, keys = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(prompt_similarity(q, keys), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    assert torch.equal(l2_normalize(torch.zeros(1, 4)), torch.zeros(1, 4))


# ---- key loss ------------------------------------------------------------------------------------------------------
def test_key_loss_by_hand_moves_only_the_selected_keys():
    keys = torch.tensor([[1.0, 0.0], [1.0, 2.0], [3.0, 3.0], [5.0, -1.0]], requires_grad=True)  # row 3 unselected
    query = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    idx = torch.tensor([[0, 2], [1, 2]])
    loss = key_loss(query, keys, idx)  # -(1/2) * ((1 + 1/sqrt 2) + (2/sqrt 5 + 1/sqrt 2))
    assert math.isclose(loss.item(), -(1 + 2 / math.sqrt(5) + math.sqrt(2)) / 2, rel_tol=1e-6)
    loss.backward()
    assert query.grad is None  # the query is the frozen model's: detached
    assert keys.grad[:3].abs().sum(1).gt(0).tolist() == [False, True, True]  # key 0 is parallel to its query
    assert torch.equal(keys.grad[3], torch.zeros(2))


# ---- the method on a tiny ViT --------------------------------------------------------------------------------------
def _method(tiny, **extra):
    cfg = load_config(None, tiny(**{"method.name": "l2p", **extra}))
    scenario, method = build_run(cfg, CPU)
    method.setup()
    return cfg, scenario, method


def _batch(task, n=6):
    return torch.stack([task.train[i][0] for i in range(n)]), torch.tensor([task.train[i][1] for i in range(n)])


def test_prompts_enter_only_through_the_seam_and_the_query_is_the_plain_backbone(tiny, monkeypatch):
    _, scenario, method = _method(tiny)
    task, model = scenario.tasks[0], method.model
    method.before_task(task)
    x, y = _batch(task)
    vit = model.backbone
    with torch.no_grad():
        plain_cls = vit.eval().forward_features(x)[:, 0]  # (B, D)
    calls = []

    def spy(vit_, x_, prompts, prompt_pos="cls"):
        calls.append((prompts.detach().clone(), prompt_pos))
        return prompted_features(vit_, x_, prompts, prompt_pos)

    monkeypatch.setattr(l2p_module, "prompted_features", spy)
    terms = method.loss((x, y), None)
    assert method.query.frozen_images == len(x)  # one query pass per batch, shared by selection and key loss
    idx = select_prompts(prompt_similarity(plain_cls, model.l2p_keys), 5, batchwise=True)
    assert len(calls) == 1 and calls[0][1] == "cls"
    assert torch.equal(calls[0][0], model.l2p_prompts[idx].flatten(1, 2).detach())  # (B, N * L_p, D)
    tokens = prompted_features(vit, x, model.l2p_prompts[idx].flatten(1, 2))
    feats = prompt_token_mean(tokens, 25, vit.num_prefix_tokens)  # (B, D)
    logits = method.mask_logits(model.head(feats), y)
    assert torch.allclose(terms["ce"], method.ce(logits, y))
    assert torch.allclose(terms["key"], 0.1 * key_loss(plain_cls, model.l2p_keys, idx))


def test_gradients_reach_the_selected_prompts_keys_and_the_current_head_only(tiny):
    _, scenario, method = _method(tiny)
    task, model = scenario.tasks[1], method.model
    method.before_task(task)
    model.set_seen(2)
    mark_trainable(model, method.trainable_prefixes(task))
    assert method.trainable_prefixes(task) == ["l2p_prompts", "l2p_keys", "head.heads.1."]
    x, y = _batch(task)
    sum(method.loss((x, y), None).values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    chosen = set(method.select(x, cache=False)[0].tolist())
    assert {i for i in range(10) if model.l2p_prompts.grad[i].abs().sum() > 0} == chosen
    assert {i for i in range(10) if model.l2p_keys.grad[i].abs().sum() > 0} == chosen
    assert model.head.heads[0].weight.grad is None and model.head.heads[1].weight.grad.abs().sum() > 0


def test_loss_predict_and_features_shapes(tiny):
    _, scenario, method = _method(tiny)
    task = scenario.tasks[0]
    method.before_task(task)
    x, y = _batch(task)
    dim = method.model.backbone.num_features
    assert method.model.l2p_prompts.shape == (10, 5, dim) and method.model.l2p_keys.shape == (10, dim)
    assert method.model.l2p_prompts.min() >= -1 and method.model.l2p_prompts.max() <= 1
    terms = method.loss((x, y), None)
    assert set(terms) == {"ce", "key"} and all(torch.isfinite(v) for v in terms.values())
    pred = method.predict(x)
    assert pred.logits.shape == (len(x), scenario.num_classes) and pred.task_ids is None
    assert torch.isfinite(pred.logits[:, : scenario.seen_classes(0)]).all()
    assert method.features(x).shape == (len(x), dim)
    assert method.predict(x).logits.equal(pred.logits)  # the second time from cached queries


def test_jax_options_init_and_prompt_position(tiny):
    _, scenario, method = _method(tiny, **{"method.prompt_init": "uniform_small", "method.prompt_pos": "none",
                                           "method.top_k": "4", "method.prompt_length": "10"})  # fmt: skip
    p = method.model.l2p_prompts
    assert p.shape[1] == 10 and p.min() >= 0 and p.max() < 0.01 and method.model.l2p_keys.max() < 0.01
    method.before_task(scenario.tasks[0])
    x, y = _batch(scenario.tasks[0])
    assert torch.isfinite(sum(method.loss((x, y), None).values()))


@pytest.mark.parametrize(("key", "value"), [("top_k", "11"), ("pool_size", "0"), ("prompt_length", "0"),
                                            ("key_weight", "-1"), ("prompt_init", "normal"), ("prompt_pos", "x"),
                                            ("head_input", "avg")])  # fmt: skip
def test_bad_options_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        _method(tiny, **{f"method.{key}": value})


# ---- presets and counts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "prompt_key", "total"), [(PRESETS[0], 46_080, 122_980),
                                                             (PRESETS[1], 84_480, 161_380)])  # fmt: skip
def test_vit_b16_trainable_counts_equal_the_spec(preset, prompt_key, total):
    """PROMPTS.md §5.1: prompts + keys + the 100-class head (here 10 heads of 10 classes) over the run."""
    head_per_task = 768 * 10 + 10
    with torch.device("meta"):  # the real ViT-B/16, no weights allocated
        info = inspect_config(load_config(preset))
        scenario, method = dry_method(load_config(preset))
    assert info["trainable_params"] == info["trainable_params_last_task"] == prompt_key + head_per_task
    params = dict(method.model.named_parameters())
    names = {n for t in scenario.tasks for n in method.trained_names(t)}
    assert sum(params[n].numel() for n in names) == total


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_parse(preset):
    cfg = load_config(preset)
    assert cfg.method.name == "l2p" and cfg.model.backbone == "vit_base_patch16_224.orig_in21k"
    assert cfg.data.normalize == "none" and cfg.scenario.order_seed is None and cfg.seed == 42
    assert cfg.train.optimizer == "adam" and cfg.train.schedule == "constant" and cfg.train.grad_clip == 1.0
    assert cfg.train.lr == pytest.approx(0.03 * cfg.train.batch_size / 256)


# ---- a tiny run ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["class_il", "task_il"])
def test_two_task_run_has_finite_losses_and_leaves_the_backbone_bit_identical(tiny, protocol):
    cfg, scenario, method = _method(tiny, **{"train.epochs": "2", "train.optimizer": "adam", "train.lr": "0.01",
                                             "train.grad_clip": "1.0", "scenario.protocol": protocol})  # fmt: skip
    assert not method.per_task and not method.task_aware_predict  # one shared pool in every protocol
    before = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    prompts = method.model.l2p_prompts.detach().clone()
    ctx = RunContext(cfg.train, CPU)
    records = []
    for task in scenario.tasks:
        fit_task(method, task, ctx)
        records.append(method.task_record(task))
    rows = [r for r in ctx.history if "ce" in r]
    assert len(rows) == 4 and all(math.isfinite(r["ce"]) and math.isfinite(r["key"]) for r in rows)
    for k, v in method.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(method.model.l2p_prompts, prompts)
    # N ids x 3 batches x 2 epochs per task, counted afresh for each task
    assert [sum(r["prompt_selection_train"]) for r in records] == [5 * 3 * 2] * 2
    heads = {f"head.heads.{t}.{p}" for t in (0, 1) for p in ("weight", "bias")}
    assert set(method.checkpoint_state()) == {"l2p_prompts", "l2p_keys", COUNTS, *heads}


def test_exported_artefact_holds_the_pool_and_heads_and_predicts_as_the_run(tiny, tmp_path):
    over = tiny(name="l2p", **{"method.name": "l2p", "train.optimizer": "adam", "train.lr": "0.01"})
    _, trained = train(load_config(None, over), log=lambda *_: None)
    retain.export_run(tmp_path / "runs" / "l2p", tmp_path / "l2p.safetensors")
    names = set(load_file(str(tmp_path / "l2p.safetensors")))
    assert names == {"l2p_prompts", "l2p_keys", *(f"head.heads.{t}.{p}" for t in (0, 1) for p in ("weight", "bias"))}
    record = json.loads((tmp_path / "runs" / "l2p" / "metrics.json").read_text())
    counts = [r["prompt_selection_train"] for r in record["method_records"]]  # per task, one count per pool prompt
    assert len(counts) == 2 and all(len(c) == trained.cfg.pool_size and sum(c) > 0 for c in counts)
    assert record["task_id_counts"] is None  # L2P chooses prompts, not tasks
    predictor = retain.load(tmp_path / "l2p.safetensors")
    x = torch.stack([trained.scenario.tasks[1].test[i][0] for i in range(4)])
    trained.model.eval()
    with trained.deployed():
        mine, theirs = trained.predict(x), predictor.method.predict(x)
    assert torch.equal(mine.logits, theirs.logits) and theirs.task_ids is None


VOTE_WORKER = """
import json, sys
import torch
from retain import distributed
from retain.methods.l2p import batch_vote
with distributed.session("cpu"):
    spec = json.loads(sys.argv[1])
    idx = torch.tensor(spec["idx"])
    lo, hi = distributed.shard_bounds(len(idx))
    votes = [batch_vote(idx[lo:hi], spec["pool"], global_batch=g)[0].tolist() for g in (True, False)]
    with open(f"vote_{distributed.rank()}.json", "w") as f:
        json.dump(votes, f)
"""


def test_the_vote_of_two_processes_counts_the_global_batch(tmp_path):
    """Each process holds half of the batch; the training vote sums their counts, so both get the one-process vote
    (their own halves would vote for other prompts)."""
    idx = [[0, 1], [0, 1], [0, 2], [3, 4], [3, 4], [3, 2]]  # one process: 3 x3, 0 x3, 4 x2, 2 x2, 1 x2 -> [0, 3]
    expected = batch_vote(torch.tensor(idx), 5)[0].tolist()
    torchrun_worker(tmp_path, VOTE_WORKER, {"idx": idx, "pool": 5})
    votes = [json.loads((tmp_path / f"vote_{r}.json").read_text()) for r in (0, 1)]
    assert expected == [0, 3]
    assert votes[0][0] == votes[1][0] == expected  # global counts
    assert votes[0][1] == [0, 1] and votes[1][1] == [3, 4]  # each half alone votes otherwise
