"""The retention probe (issue #25 item 6): the feature pass sharded and gathered to rank 0 alone, the k-NN there, the
accuracy broadcast; one process gives the numbers of the gathered path bit for bit, two the one-process number; the
score before training is cached by its key (same backbone and probe: reused; another k or initial weight: not)."""

import json

import pytest
import torch
from test_distributed import _torchrun

from retain.config import load_config
from retain.engine import RunContext, build_run, run
from retain.engine.build import retention_datasets
from retain.engine.evaluation import retention_accuracy
from retain.engine.retention import CACHE_FOLDER
from retain.features import weighted_knn_accuracy
from retain.methods.finetune import Finetune

from conftest import tiny_overrides

CPU = torch.device("cpu")
RETENTION = {
    "method.name": "finetune",
    "data.retention.name": "synthetic",
    "data.retention.options": "{n_classes: 3, n_per_class: 10, n_test_per_class: 5, image_size: 16, seed: 7}",
    "data.retention.k": "5",
    "train.eval_batch_size": "4",  # 30 + 15 images: both processes hold part of each set
}

WORKER = """
import json, sys
import torch
from retain import distributed
from retain.config import load_config
from retain.engine import RunContext, build_run, run
from retain.engine.build import retention_datasets
from retain.engine.evaluation import retention_accuracy

spec = json.loads(sys.argv[1])
with distributed.session("cpu"):
    cfg = load_config(None, spec["over"])
    scenario, method = build_run(cfg, torch.device("cpu"))
    method.bind(RunContext(cfg.train, torch.device("cpu")))
    acc = retention_accuracy(method, retention_datasets(cfg, scenario.tasks[0].test.base), cfg.data.retention.k)
    r = distributed.rank()
    uneven = distributed.gather_rows_to_main(torch.arange(1 + 3 * r * 2, dtype=torch.float32).reshape(-1, 1) + r)
    empty = distributed.gather_rows_to_main(torch.tensor([[5, 6]]) if r == 0 else None)
    runs = [["name=a"], ["name=b"], ["name=c", "data.retention.k=3"]]
    records = [run(load_config(None, spec["over"] + r), log=lambda *_: None) for r in runs]
    if r == 0:
        out = {"acc": acc, "uneven": uneven.flatten().tolist(), "empty": empty.tolist(),
               "retention": [rec["retention_knn"] for rec in records]}
        open("result.json", "w").write(json.dumps(out))
    else:
        assert uneven is None and empty is None
"""


def _method(over: list[str]):
    cfg = load_config(None, over)
    scenario, method = build_run(cfg, CPU)
    method.bind(RunContext(cfg.train, CPU))
    return cfg, method, retention_datasets(cfg, scenario.tasks[0].test.base)


def test_knn_in_place_and_on_its_inputs_device_keeps_the_numbers():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    y_train, y_test = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (70,), generator=g)
    ref = weighted_knn_accuracy(train, y_train, test, y_test, k=7, chunk=16)
    bank = train.clone()
    assert weighted_knn_accuracy(bank, y_train, test, y_test, k=7, chunk=16, in_place=True) == ref
    assert not torch.equal(bank, train)  # normalised in place: no second copy
    if torch.cuda.is_available():
        cuda = weighted_knn_accuracy(train.cuda(), y_train, test, y_test, k=7, chunk=16)
        assert cuda == pytest.approx(ref, abs=100 / 70)  # another matmul: a near-tie may flip


def test_one_process_probe_is_bit_identical_to_the_gathered_cpu_path(tmp_path):
    """Autocast is off on the CPU (``RunContext.autocast``), so the pass, and the k-NN, are the ones before."""
    cfg, method, sets = _method(tiny_overrides(tmp_path, **RETENTION, **{"train.amp": "true"}))
    assert not torch.is_autocast_enabled("cpu")
    with method.ctx.autocast:
        assert not torch.is_autocast_enabled("cpu")
    (f_train, y_train), (f_test, y_test) = (method.extract_features(s, forward=method.features).tensors for s in sets)
    before = weighted_knn_accuracy(f_train, y_train, f_test, y_test, k=cfg.data.retention.k)
    assert retention_accuracy(method, sets, k=cfg.data.retention.k) == before  # ==: bit for bit


def _counting(monkeypatch) -> list[int]:
    calls, real = [], Finetune.features

    def features(self, x):
        calls.append(len(x))
        return real(self, x)

    monkeypatch.setattr(Finetune, "features", features)
    return calls


def test_score_before_training_is_cached_by_backbone_and_probe(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    probe = 30 + 15  # the retention train and test images
    lines = []

    def go(name: str, **extra: str) -> tuple[list[float], int]:
        calls.clear()
        over = tiny_overrides(tmp_path, **(RETENTION | {"name": name} | extra))
        rec = run(load_config(None, over), log=lines.append)
        return rec["retention_knn"], sum(calls) // probe

    first, n = go("a")
    assert n == 3 and len(first) == 3  # before training and after each of 2 tasks
    again, n = go("b", **{"train.lr": "0.5"})  # another run from the same backbone: the first probe is read
    assert n == 2 and again[0] == first[0]
    assert sum("[retention]" in line and "reused" in line for line in lines) == 1
    assert go("c", **{"data.retention.k": "3"})[1] == 3  # another k: computed
    assert go("d", seed="1")[1] == 3  # other initial weights (pretrained=false: seeded init): computed
    cached = sorted((tmp_path / "runs" / CACHE_FOLDER).glob("*"))
    assert len(cached) == 3 and all(p.suffix == ".json" for p in cached)
    assert {json.loads(p.read_text())["key"]["retention"]["k"] for p in cached} == {3, 5}


def test_two_processes_match_one(tmp_path):
    """2 gloo processes: the same accuracy as one; rank 0 alone receives the gathered rows; the cache is decided by
    rank 0 and followed by both (the second run reads what the first wrote, the third what a one-process run in
    another process wrote)."""
    over = tiny_overrides(tmp_path, **RETENTION, **{"train.threads": "1"})
    cfg, method, sets = _method(over)
    one = retention_accuracy(method, sets, k=cfg.data.retention.k)
    k3 = run(load_config(None, [*over, "name=one", "data.retention.k=3"]), log=lambda *_: None)["retention_knn"]
    (tmp_path / "worker.py").write_text(WORKER)
    _torchrun([str(tmp_path / "worker.py"), json.dumps({"over": over})], tmp_path)
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["acc"] == one
    assert out["uneven"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # rank 0: 1 row, rank 1: 7 rows
    assert out["empty"] == [[5, 6]]
    a, b, c = out["retention"]
    assert b[0] == a[0] == one  # a: computed by 2 processes and cached; b: read
    assert c[0] == k3[0]  # read from the cache the one-process run wrote
    assert len(list((tmp_path / "runs" / CACHE_FOLDER).glob("*.json"))) == 2
