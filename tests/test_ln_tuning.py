"""LN tuning (De Min et al., ICCVW 2023): per-task LayerNorm rows, task keys, the two-stage schedule, its options."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retain.cli import main
from retain.config import ConfigError, config_to_dict, load_config
from retain.engine import RunContext, build_run, evaluate, fit_task, run
from retain.inspect import dry_scenario
from retain.methods.ln_tuning import closed_form_key, key_loss, select_task, similarity_weights
from retain.models import create_backbone
from retain.models.adapters import set_task, use_task
from retain.models.task_layernorm import PRETRAINED, TaskLayerNorm, inject_task_layernorm, task_layernorms

from conftest import interrupted_then_resumed

CPU = torch.device("cpu")
FAITHFUL = {"method.closed_form_keys": "false", "method.head_features": "online", "method.cache_queries": "false",
            "method.mixed_batch": "false", "method.query_model": "copy"}  # fmt: skip


def _method(tiny, **extra):
    cfg = load_config(None, tiny(**{"method.name": "ln_tuning", "method.head_epochs": "2", **extra}))
    torch.manual_seed(0)  # the same random "pre-trained" backbone in every call
    scenario, method = build_run(cfg, CPU)
    method.setup()
    return cfg, scenario, method


def _rows(method):
    return {k: v.detach().clone() for k, v in method.checkpoint_state().items()}


# ---------------------------------------------------------------------------------------------- the LN adapter


def test_task_layernorm_matches_hand_computation():
    base = nn.LayerNorm(4, eps=1e-6)
    ln = TaskLayerNorm(base, n_tasks=3)
    with torch.no_grad():
        ln.ln_weight.copy_(torch.tensor([[1.0, 2, 3, 4], [0.5, 0.5, 0.5, 0.5], [-1, 0, 1, 2]]))
        ln.ln_bias.copy_(torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]]))
    x = torch.tensor([[[1.0, 2, 3, 6], [0, 0, 4, 4]], [[2.0, 2, 2, 10], [1, -1, 1, -1]]])  # (B=2, N=2, D=4)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    xhat = (x - mean) / torch.sqrt(var + 1e-6)
    ln.task = 1
    assert torch.allclose(ln(x), xhat * 0.5 + 1, atol=1e-6)
    ln.task = PRETRAINED  # the pre-trained values (ones, zeros) are kept as buffers
    assert torch.allclose(ln(x), xhat, atol=1e-6)
    ln.task = torch.tensor([0, 2])  # per-sample rows
    expected = torch.stack([xhat[0] * ln.ln_weight[0] + ln.ln_bias[0], xhat[1] * ln.ln_weight[2] + ln.ln_bias[2]])
    assert torch.allclose(ln(x), expected, atol=1e-6)
    assert ln.eps == 1e-6 and {n for n, _ in ln.named_parameters()} == {"ln_weight", "ln_bias"}


def test_inject_replaces_every_layernorm_and_starts_as_the_pretrained_model():
    vit = create_backbone("vit_nano_patch4_32", pretrained=False, depth=2)
    with torch.no_grad():
        for m in vit.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
    ref = copy.deepcopy(vit).eval()
    names = inject_task_layernorm(vit, n_tasks=3)
    assert names == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert all(m.eps == 1e-6 for m in task_layernorms(vit))
    assert not any(isinstance(m, nn.LayerNorm) for m in vit.modules())
    x = torch.rand(2, 3, 32, 32)
    vit.eval()
    for task in (PRETRAINED, 0, 2, torch.tensor([1, 2])):
        with use_task(vit, task):
            assert torch.allclose(vit.forward_features(x), ref.forward_features(x), atol=1e-5)
    with use_task(vit, PRETRAINED):
        assert torch.equal(vit.forward_features(x), ref.forward_features(x))  # bit-identical query path


# ---------------------------------------------------------------------------------------------- keys


def test_key_loss_and_selection_on_hand_made_tensors():
    q = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 1.0], [-1.0, 0.1]])
    keys = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    assert select_task(q, keys).tolist() == [0, 1, 0, 2]
    assert select_task(q, keys[:2]).tolist() == [0, 1, 0, 1]  # only tasks <= 1 seen
    assert key_loss(q[:2], torch.tensor([1.0, 0.0])).item() == pytest.approx(-0.5)
    assert key_loss(q[:2], torch.tensor([1.0, 1.0])).item() == pytest.approx(-(2**-0.5))


def test_closed_form_key_beats_or_equals_a_trained_key():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(200, 16, generator=gen) + torch.linspace(-1, 2, 16)  # (B, D), a mean direction
    key = nn.Parameter(nn.init.orthogonal_(torch.empty(1, 16), generator=gen)[0])
    opt = torch.optim.Adam([key], lr=0.01)
    for _ in range(500):
        opt.zero_grad()
        key_loss(q, key).backward()
        opt.step()
    best = closed_form_key(q)
    assert key_loss(q, best) <= key_loss(q, key.detach()) + 1e-6
    assert key_loss(q, best) < key_loss(q, best + 0.05 * torch.randn(16, generator=gen))
    assert torch.allclose(best.norm(), torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------- the method


def test_old_rows_and_keys_bit_identical_after_a_later_task(tiny):
    # a large lr and a non-zero train.weight_decay: the stages force wd 0 and a fresh Adam, so zero grads move nothing
    extra = {"train.optimizer": "adam", "train.lr": "0.05", "train.epochs": "2", "train.weight_decay": "0.3",
             "method.closed_form_keys": "false"}  # fmt: skip
    cfg, scenario, method = _method(tiny, **extra)
    ctx = RunContext(cfg.train, CPU)
    fit_task(method, scenario.tasks[0], ctx)
    after0 = _rows(method)
    fit_task(method, scenario.tasks[1], ctx)
    after1 = method.checkpoint_state()
    tables = [k for k in after0 if k.endswith(("ln_weight", "ln_bias")) or k == "ln_keys"]
    assert len(tables) == 2 * 3 + 1  # norm1, norm2 of one block + final norm; the keys
    for k in tables:
        assert torch.equal(after1[k][0], after0[k][0]), f"row 0 of {k} moved during task 1"
        assert not torch.equal(after1[k][1], after0[k][1]), f"row 1 of {k} was not trained"
    for k in after0:
        if k.startswith("head.heads.0."):
            assert torch.equal(after1[k], after0[k]), k


def test_new_task_row_starts_as_a_copy_of_the_previous_one(tiny):
    cfg, scenario, method = _method(tiny, **{"train.optimizer": "adam", "method.rectify": "false"})
    fit_task(method, scenario.tasks[0], RunContext(cfg.train, CPU))
    method.before_task(scenario.tasks[1])
    for m in task_layernorms(method.model.backbone):
        assert torch.equal(m.ln_weight[1], m.ln_weight[0]) and torch.equal(m.ln_bias[1], m.ln_bias[0])
        assert not torch.equal(m.ln_weight[0], m.pretrained_weight)


def test_queries_are_the_frozen_pretrained_cls_after_final_norm(tiny):
    cfg, scenario, method = _method(tiny, **{"train.optimizer": "adam", "train.lr": "0.05"})
    frozen = copy.deepcopy(method.query_model or method.model.backbone)
    set_task(frozen, PRETRAINED)  # == the original ViT (checked bit-exactly in the inject test)
    for task in scenario.tasks:
        fit_task(method, task, RunContext(cfg.train, CPU))
    x = torch.stack([scenario.tasks[1].test[i][0] for i in range(6)])
    with torch.no_grad():
        expected = frozen.eval().forward_features(x)[:, 0]
    assert torch.equal(method.queries(x, cache=False), expected)
    assert torch.equal(method.queries(x, cache=True), expected)
    _, _, copied = _method(tiny, **{"method.query_model": "copy"})
    copied.model.load_state_dict(method.model.state_dict())
    assert torch.equal(copied.queries(x, cache=False), expected)


def test_closed_form_key_is_fitted_on_the_task_images(tiny):
    cfg, scenario, method = _method(tiny)
    task = scenario.tasks[0]
    method.before_task(task)
    x = torch.stack([task.train_eval[i][0] for i in range(len(task.train_eval))])
    assert torch.allclose(method.model.ln_keys[0], closed_form_key(method.queries(x, cache=False)), atol=1e-6)
    stages = method.stages(task)  # the key stage stays, with 0 epochs: the LN stage is stage 1 in both schedules
    assert [s.name for s in stages] == ["keys", "ln", "head"] and stages[0].epochs == 0


def test_mixed_task_single_pass_equals_per_task_passes(tiny):
    cfg, scenario, method = _method(tiny)
    with torch.no_grad():
        for m in task_layernorms(method.model.backbone):
            m.ln_weight.normal_()
            m.ln_bias.normal_()
    method.model.eval()
    x = torch.stack([scenario.tasks[1].test[i][0] for i in range(6)])
    ids = torch.tensor([1, 0, 0, 1, 1, 0])
    with torch.no_grad():
        one_pass = method.task_features(x, ids)
        method.cfg.mixed_batch = False
        split = method.task_features(x, ids)
        each = []
        for i in range(len(x)):
            with use_task(method.model.backbone, int(ids[i])):
                each.append(method.model.features(x[i : i + 1]))
    assert torch.allclose(one_pass, split, atol=1e-5) and torch.allclose(one_pass, torch.cat(each), atol=1e-5)


def test_each_image_goes_through_the_frozen_model_once(tiny):
    cfg, scenario, method = _method(tiny)
    ctx = RunContext(cfg.train, CPU)
    for task in scenario.tasks:
        fit_task(method, task, ctx)
        evaluate(method, scenario, task.index, ctx)
    n_images = sum(len(t.train_eval) + len(t.test) for t in scenario.tasks)
    assert method.frozen_images == len(method.query_cache) == n_images


SCHEDULES = [{}, FAITHFUL, {"method.variant": "single_stage"},
             {"method.variant": "single_stage", "method.head_features": "online"}]  # fmt: skip


@pytest.mark.parametrize("options", SCHEDULES)
def test_schedules_train_and_predict_task_ids(tiny, options):
    cfg, scenario, method = _method(tiny, **{"train.optimizer": "adam", "train.lr": "0.01", **options})
    ctx = RunContext(cfg.train, CPU)
    before = _rows(method)
    for task in scenario.tasks:
        fit_task(method, task, ctx)
        ev = evaluate(method, scenario, task.index, ctx)
        accs, tid = ev.primary, ev.task_id
        assert len(accs) == task.index + 1 and tid is not None and 0 <= tid <= 100
    after = method.checkpoint_state()
    assert not torch.equal(after["head.heads.1.weight"], before["head.heads.1.weight"])  # stage 2 ran
    if "ln_keys" in after:  # two-stage: keys moved from their orthogonal init (Adam or closed form)
        assert not torch.equal(after["ln_keys"][1], before["ln_keys"][1])
    x = torch.stack([scenario.tasks[1].test[i][0] for i in range(4)])
    pred = method.predict(x)
    logits, ids = pred.logits, pred.task_ids
    assert torch.isfinite(logits[:, : scenario.seen_classes(1)]).all() and ids.shape == (4,) and ids.max() <= 1


def test_faithful_and_fast_schedules_agree_when_the_data_is_deterministic(tiny):
    """With no augmentation, caching and the closed-form pass change cost, not the stage-2 features."""
    _, scenario, fast = _method(tiny, **{"train.optimizer": "adam"})
    _, _, slow = _method(tiny, **{"train.optimizer": "adam", **FAITHFUL})
    slow.model.load_state_dict(fast.model.state_dict())
    task = scenario.tasks[0]
    fast.before_task(task)
    slow.before_task(task)
    slow.model.ln_keys.data.copy_(fast.model.ln_keys)
    feats, labels = fast._head_features(task).tensors
    x = torch.stack([task.train_eval[i][0] for i in range(len(task.train_eval))])
    assert torch.allclose(slow._online_head_features(x, 0), feats, atol=1e-5)


def test_single_stage_has_per_layer_keys_and_a_similarity_term(tiny):
    cfg, scenario, method = _method(tiny, **{"method.variant": "single_stage"})
    assert "ln_keys" not in dict(method.model.named_parameters())
    layer = task_layernorms(method.model.backbone)[0]
    assert layer.ln_key.shape == layer.ln_att.shape == (2, 32)
    method.before_task(scenario.tasks[0])
    x, y = next(iter(torch.utils.data.DataLoader(scenario.tasks[0].train, batch_size=4)))
    stage = method.stages(scenario.tasks[0])[0]
    terms = method.loss((x, y), stage)
    assert set(terms) == {"ce", "sim"} and -1 <= -terms["sim"].item() <= 1
    assert method.param_breakdown(scenario.tasks[0])["ln"] == 3 * 4 * 32


def test_bad_option_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="method.head_features='sometimes'; valid: cached, online"):
        _method(tiny, **{"method.head_features": "sometimes"})


# ---------------------------------------------------------------------------------------------- storage + runs


def test_vit_b16_stores_38400_ln_values_per_task(capsys):
    assert main(["inspect", "ln_tuning/cifar100", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ln, key, head = 25 * 2 * 768, 768, 768 * 10 + 10
    assert ln == 38_400
    assert info["bytes_per_task"] == 4 * (ln + key + head)  # one row of every LN table, one key, one head
    # what a run trains by gradient (tensors hold all 10 tasks' rows; only row t moves): the paper preset trains the
    # keys by Adam (the official schedule), so tables + keys + head + fake head
    assert info["trainable_params"] == 10 * ln + 10 * key + 2 * head == 407_060
    assert info["class_order_head"] == [23, 8, 11, 7, 48, 13, 1, 91, 94, 54]  # seed 0
    # the fast preset fits the keys in closed form: fitted, not trained, so they do not count
    assert main(["inspect", "ln_tuning/cifar100_fast", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["trainable_params"] == 10 * ln + 2 * head and fast["bytes_per_task"] == info["bytes_per_task"]
    assert fast["class_order_head"] == info["class_order_head"]


@pytest.mark.parametrize("dataset", ["cifar100", "imagenet_r"])
def test_paper_presets_run_the_official_schedule_and_fast_presets_differ_only_in_it(dataset):
    cfg = load_config(f"ln_tuning/{dataset}")
    m = cfg.method
    assert (m.closed_form_keys, m.head_features, m.key_epochs, m.rectify, m.train_mask) == (
        False, "online", None, True, "current")  # fmt: skip
    assert (m.head_epochs, m.head_lr, m.sim_weights, m.variant) == (5, 0.001, "official", "two_stage")
    assert (cfg.train.amp, cfg.train.tf32, cfg.train.grad_clip, cfg.train.label_smoothing) == (False, False, None, 0)
    assert (cfg.seed, cfg.scenario.order_seed, cfg.scenario.order_rng) == (0, 0, "python")
    fast = config_to_dict(load_config(f"ln_tuning/{dataset}_fast"))
    faithful = config_to_dict(cfg)
    assert (fast.pop("name"), faithful.pop("name")) == (f"ln_tuning-{dataset}_fast", f"ln_tuning-{dataset}")
    changed = {k: v for k, v in fast["method"].items() if faithful["method"][k] != v}
    assert changed == {"closed_form_keys": True, "head_features": "cached"}
    fast["method"] = faithful["method"]
    assert fast == faithful  # float32 and the seed included
    library = load_config(None, ["method.name=ln_tuning"]).method  # outside the presets: the fast schedule
    assert (library.closed_form_keys, library.head_features) == (True, "cached")


def test_imagenet_r_preset_order_and_lr():
    cfg = load_config("ln_tuning/imagenet_r")
    assert dry_scenario(cfg).class_order[:6] == [131, 181, 22, 172, 144, 92]
    assert cfg.train.lr == 0.01 * 128 / 256 and cfg.data.normalize == "none" and cfg.scenario.n_tasks == 10


def test_run_reports_task_id_accuracy_and_resumes_identically(tiny, monkeypatch):
    over = tiny(**{"method.name": "ln_tuning", "train.optimizer": "adam"})
    full, resumed = interrupted_then_resumed(over, monkeypatch)
    assert len(full["task_id_accuracy"]) == 2 and full["bytes_per_task"][0] == 4 * (3 * 2 * 32 + 32 + 2 * 32 + 2)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["task_id_accuracy"] == full["task_id_accuracy"]
    # the counts behind the task-id accuracy: after task t, row i = the test images of task i by the task chosen
    counts = full["task_id_counts"]
    assert [len(c) for c in counts] == [1, 2] and all(len(row) == 2 for c in counts for row in c)
    for c, acc in zip(counts, full["task_id_accuracy"], strict=True):
        hits, total = sum(c[i][i] for i in range(len(c))), sum(map(sum, c))
        assert 100.0 * hits / total == pytest.approx(acc)
    assert counts[0][0][1] == 0  # before task 1 only task 0's key exists
    assert resumed["task_id_counts"] == counts and full["method_records"] is None


def test_key_stage_loss_is_the_negative_mean_cosine(tiny):
    cfg, scenario, method = _method(tiny, **{"method.closed_form_keys": "false"})
    task = scenario.tasks[0]
    method.before_task(task)
    stage = method.stages(task)[0]
    assert stage.name == "keys" and stage.params == ["ln_keys"]
    x, y = next(iter(torch.utils.data.DataLoader(task.train, batch_size=5)))
    q = method.queries(x, cache=False)
    expected = -F.cosine_similarity(q, method.model.ln_keys[0].unsqueeze(0), dim=1).mean()
    assert torch.allclose(stage.loss((x, y))["key"], expected, atol=1e-6)


def test_task_incremental_protocol_uses_the_oracle_rows(tiny):
    cfg, scenario, method = _method(tiny, **{"scenario.protocol": "task_il"})
    ctx = RunContext(cfg.train, CPU)
    for task in scenario.tasks:
        fit_task(method, task, ctx)
    ev = evaluate(method, scenario, 1, ctx)
    # task-aware view: the given task's rows; task-agnostic view: routed by the keys, so task ids are predicted
    assert set(ev.accuracy) == {"taw", "tag"} and len(ev.accuracy["taw"]) == 2 and ev.task_id is not None
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(len(scenario.tasks[0].test))])
    y = torch.tensor([scenario.tasks[0].test[i][1] for i in range(len(scenario.tasks[0].test))])
    with use_task(method.model.backbone, 0):
        oracle = method.model.eval()(x)[:, :2].argmax(1)
    assert ev.accuracy["taw"][0] == pytest.approx(100.0 * (oracle == y).float().mean().item())


# ---------------------------------------------------------------------------------------------- precision


def _near_tie_keys(q: torch.Tensor) -> torch.Tensor:
    """(2, D) keys at cosines 0.9999 and 0.99995 to q (D,): key 1 wins in float32, bf16 rounds both to 1.0."""
    gen = torch.Generator().manual_seed(0)
    u = F.normalize(q.float(), dim=0)
    v = torch.randn(len(u), generator=gen)
    v = F.normalize(v - (v @ u) * u, dim=0)  # orthogonal to u
    return torch.stack([c * u + sign * (1 - c * c) ** 0.5 * v for c, sign in ((0.9999, 1.0), (0.99995, -1.0))])


def test_selection_and_logits_are_float32_under_bf16_autocast(tiny):
    _, scenario, method = _method(tiny)
    method.task = scenario.tasks[1]  # routing among tasks 0..1
    method.model.set_seen(2)
    method.model.eval()
    x = torch.stack([scenario.tasks[1].test[i][0] for i in range(4)])
    q = method.queries(x, cache=False)  # float32 reference, no autocast
    keys = _near_tie_keys(q[0])
    with torch.no_grad():
        method.model.ln_keys[:2].copy_(keys)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with bf16:  # the near-tie is real: a bf16 similarity picks key 0, float32 key 1
        naive = (F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T).argmax(1)
    assert naive[0].item() == 0 and select_task(q, keys)[0].item() == 1
    ref = method.predict(x)
    ref_logits, ref_ids = ref.logits, ref.task_ids
    with bf16:
        assert torch.equal(method.queries(x, cache=False), q)  # the frozen pass is float32 under autocast
        assert torch.equal(select_task(q, keys), ref_ids)
        pred = method.predict(x)
        logits, ids = pred.logits, pred.task_ids
        oracle = method.predict(x, 0).logits
    assert ids[0].item() == 1 and torch.equal(ids, ref_ids)  # test routes as stage 2 (float32) does
    assert logits.dtype == oracle.dtype == ref_logits.dtype == torch.float32
    with bf16:  # key-stage loss and the closed-form key are float32 too
        assert key_loss(q, keys[0]).dtype == closed_form_key(q).dtype == torch.float32


def test_single_stage_selection_is_float32_under_bf16_autocast():
    ln = TaskLayerNorm(nn.LayerNorm(32, eps=1e-6), n_tasks=2, selector=True)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))  # (B, N, D)
    with torch.no_grad():
        ln.ln_att.fill_(1.0)
        ln.ln_key.copy_(_near_tie_keys(x[0, 0]))
    ref = ln._select(x, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ln._select(x, 1), ref) and ref[0].item() == 1
        assert torch.equal(ln._select(x.bfloat16(), 1), ln._select(x.bfloat16().float(), 1))
        assert ln._similarity(x[:, 0], torch.tensor([0, 1, 1])).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- single-stage weights


def test_official_similarity_weights_for_vit_b16():
    names = [f"blocks.{i}.norm{j}" for i in range(12) for j in (1, 2)] + ["norm"]
    w = similarity_weights(names)
    assert w[:24] == [pytest.approx(1 / 26)] * 24 and w[24] == pytest.approx(1 / 13)
    assert sum(w) == pytest.approx(1.0)
    assert similarity_weights(names, "uniform") == [pytest.approx(1 / 25)] * 25


def test_single_stage_similarity_term_by_hand(tiny):
    kw = "{depth: 2, embed_dim: 32, num_heads: 2, img_size: 16}"
    for scheme in ("uniform", "official"):
        _, scenario, method = _method(tiny, **{"method.variant": "single_stage", "model.kwargs": kw,
                                               "method.sim_weights": scheme})  # fmt: skip
        layers = task_layernorms(method.model.backbone)  # blocks.0.norm1/norm2, blocks.1.norm1/norm2, norm
        for m, values in zip(layers, ([0.1, 0.1], [0.3, 0.1], [0.3, 0.4], [0.4, 0.4], [0.5, 0.5]), strict=True):
            m.similarity = torch.tensor(values)  # (B,) cosines of a batch of 2; layer means 0.1 0.2 0.35 0.4 0.5
        # official: per block (norm1 + norm2) / 2, then over the 2 blocks and the final norm
        expected = ((0.1 + 0.2) / 2 + (0.35 + 0.4) / 2 + 0.5) / 3 if scheme == "official" else 1.55 / 5
        assert method.similarity_term().item() == pytest.approx(expected)
    method.before_task(scenario.tasks[0])  # the loss uses the same term (official weights), from its oracle pass
    x, y = next(iter(torch.utils.data.DataLoader(scenario.tasks[0].train, batch_size=4)))
    terms = method.loss((x, y), method.stages(scenario.tasks[0])[0])
    w = [1 / 6] * 4 + [1 / 3]  # 2 blocks of 2 LNs and the final norm
    by_hand = sum(wl * m.similarity.mean() for wl, m in zip(w, layers, strict=True))
    assert torch.allclose(terms["sim"], -by_hand, atol=1e-6)


# ---------------------------------------------------------------------------------------------- plain forwards


@pytest.mark.parametrize("variant", ["two_stage", "single_stage"])
def test_plain_forward_outside_a_task_is_the_pretrained_backbone(tiny, variant):
    over = {"train.optimizer": "adam", "train.lr": "0.05", "method.variant": variant}
    cfg, scenario, method = _method(tiny, **over)
    torch.manual_seed(0)  # the same random "pre-trained" backbone, left as it is (finetune changes nothing here)
    _, plain = build_run(load_config(None, tiny(**{"method.name": "finetune"})), CPU)
    ref = plain.model.eval()
    x = torch.stack([scenario.tasks[0].test[i][0] for i in range(6)])

    method.model.eval()  # right after building
    assert all(m.task == PRETRAINED for m in task_layernorms(method.model.backbone))
    with torch.no_grad():
        assert torch.equal(method.model.features(x), ref.features(x))
        assert torch.equal(method.model.backbone.forward_features(x), ref.backbone.forward_features(x))
        assert torch.equal(method.model(x), ref(x))  # the heads too: LN tuning added rows, not changed any
    assert torch.equal(method.features(x), ref.features(x))  # the retention probe before the first task
    ctx = RunContext(cfg.train, CPU)
    fit_task(method, scenario.tasks[0], ctx)
    evaluate(method, scenario, 0, ctx)
    rows = task_layernorms(method.model.backbone)[0]
    assert not torch.equal(rows.ln_weight[0], rows.pretrained_weight)  # task 0's rows did move
    method.model.eval()
    with torch.no_grad():
        assert torch.equal(method.model.features(x), ref.features(x))  # ... and a plain forward ignores them
        assert torch.equal(method.model.backbone.forward_features(x), ref.backbone.forward_features(x))
        assert all(m.task == PRETRAINED for m in task_layernorms(method.model.backbone))


def test_retention_probe_before_training_is_the_frozen_backbones(tiny):
    opts = "{n_classes: 3, n_per_class: 10, n_test_per_class: 5, image_size: 16, seed: 7}"
    retention = {"data.retention.name": "synthetic", "data.retention.options": opts}
    ln = run(load_config(None, tiny(name="ln", **{"method.name": "ln_tuning", **retention})), log=lambda *_: None)
    frozen = run(load_config(None, tiny(name="lp", **{"method.name": "linear_probe", **retention})),
                 log=lambda *_: None)  # fmt: skip
    assert len(ln["retention_knn"]) == 3 and ln["retention_knn"][0] == frozen["retention_knn"][0]
