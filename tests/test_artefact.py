"""Export -> load -> predict: the artefact holds only what the tasks added and predicts as the run evaluated."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import retain
from retain.artefact import ARTEFACT_FILE
from retain.cli import main
from retain.config import load_config
from retain.data import create_dataset
from retain.engine import build_run, evaluation, run, train
from retain.methods import method_names
from retain.models import create_backbone

CPU = torch.device("cpu")


@pytest.fixture
def png_root(tmp_path):
    """The tiny synthetic stream as PNG files in ``train/<class>/`` and ``test/<class>/`` (lossless)."""
    root = tmp_path / "images"
    for split in ("train", "test"):
        ds = create_dataset("synthetic", split, n_classes=4, n_per_class=12, n_test_per_class=6, image_size=16)
        for i in range(len(ds)):
            folder = root / split / f"class{ds.targets[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i]).save(folder / f"{i:03d}.png")
    return root


def _config(tiny, png_root, method, protocol="class_il"):
    over = {"method.name": method, "data.name": "imagefolder", "data.root": str(png_root), "data.options": "{}",
            "scenario.protocol": protocol, "train.epochs": "3", "train.lr": "0.05", "name": method}  # fmt: skip
    if method == "confit":
        over |= {"model.backbone": "cifar_resnet20", "model.kwargs": "{}"}
    return load_config(None, tiny(**over))


def _run_recording_predictions(cfg, monkeypatch):
    """Run ``cfg``; returns its record and the primary view's predicted labels of each task at the last evaluation."""
    seen = []
    real = evaluation._Counts.add

    def add(self, view, pred, y):
        seen.append((view, pred.tolist()))
        real(self, view, pred, y)

    monkeypatch.setattr(evaluation._Counts, "add", add)
    record = run(cfg, log=lambda *_: None)
    monkeypatch.undo()
    view, n = record["primary_view"], record["n_tasks"]
    return record, [p for v, p in seen if v == view][-n:]


@pytest.mark.parametrize(("method", "protocol"), [("finetune", "class_il"), ("ln_tuning", "class_il"),
                                                  ("confit", "task_il"), ("block_expansion", "task_il"),
                                                  ("lora", "class_il")])  # fmt: skip
def test_exported_artefact_predicts_what_the_run_evaluated(tiny, tmp_path, png_root, monkeypatch, method, protocol):
    if method not in method_names():
        pytest.skip(f"{method} has not landed")
    cfg = _config(tiny, png_root, method, protocol)
    record, labels = _run_recording_predictions(cfg, monkeypatch)
    meta = retain.export_run(tmp_path / "runs" / method, tmp_path / "model.safetensors")
    predictor = retain.load(tmp_path / "model.safetensors")
    scenario, _ = build_run(cfg, CPU)
    routed, accuracy = [], []
    for task, expected in zip(scenario.tasks, labels, strict=True):
        files = [task.test.base.paths[i] for i in task.test.indices]
        preds = predictor.predict(files, task=task.index if protocol == "task_il" else None)
        assert [p.label for p in preds] == expected
        assert [p.name for p in preds] == [scenario.class_names[p.label] for p in preds]
        routed += [p.task for p in preds]
        accuracy.append(100.0 * np.mean([p.label == y for p, y in zip(preds, task.test.targets, strict=True)]))
    assert accuracy == record["accuracy_matrix"][-1]
    assert (None in routed) == (method != "ln_tuning")  # LN tuning routes each image to a task
    assert meta["tasks_trained"] == "2" and json.loads(meta["scenario"])["class_names"] == scenario.class_names


OWN = {
    "ln_tuning": lambda n: n.startswith("head.heads.") or ".ln_" in n or n == "ln_keys",
    "lora": lambda n: n.startswith("head.heads.") or ".lora_" in n,
    "block_expansion": lambda n: n.startswith(("head.heads.", "backbone.blocks.1.tasks.")),
}


@pytest.mark.parametrize(("method", "protocol"), [("ln_tuning", "class_il"), ("lora", "task_il"),
                                                  ("block_expansion", "task_il")])  # fmt: skip
def test_per_task_artefact_after_each_task_holds_what_the_tasks_own_and_reloads(tiny, tmp_path, monkeypatch, method,
                                                                                protocol):  # fmt: skip
    """``run.export_each_task`` writes ``retain export``'s artefact after every task; it holds exactly the tensors
    the tasks own (``Method.task_state``: bytes equal) and ``retain.load`` predicts bit-identically to the run."""
    import retain.artefact

    written, real = [], retain.artefact.write_artefact

    def spy(method_, cfg, info, n, initial, out):
        written.append(n)
        return real(method_, cfg, info, n, initial, out)

    monkeypatch.setattr(retain.artefact, "write_artefact", spy)
    over = tiny(name=method, **{"method.name": method, "scenario.protocol": protocol, "train.lr": "0.1",
                                "run.export_each_task": "true"})  # fmt: skip
    _, trained = train(load_config(None, over), log=lambda *_: None)
    assert written == [1, 2]
    art, again = tmp_path / "runs" / method / ARTEFACT_FILE, tmp_path / "again.safetensors"
    retain.export_run(tmp_path / "runs" / method, again)
    tensors, exported = load_file(str(art)), load_file(str(again))
    assert tensors.keys() == exported.keys() and all(torch.equal(tensors[k], exported[k]) for k in tensors)
    assert tensors and all(OWN[method](n) for n in tensors)
    stored = sum(v.numel() * v.element_size() for v in tensors.values())
    assert stored == sum(trained.bytes_per_task(t) for t in trained.scenario.tasks)
    predictor = retain.load(art)
    x = torch.stack([trained.scenario.tasks[1].test[i][0] for i in range(3)])
    trained.model.eval()
    with trained.deployed():
        for t in (0, 1) if protocol == "task_il" else (None,):
            mine, theirs = trained.predict(x, t), predictor.method.predict(x, t)
            assert torch.equal(mine.logits, theirs.logits)
            assert (mine.task_ids is None and theirs.task_ids is None) or torch.equal(mine.task_ids, theirs.task_ids)


def test_the_artefact_holds_only_what_the_tasks_added(tiny, tmp_path, png_root):
    cfg = _config(tiny, png_root, "ln_tuning")
    run(cfg, log=lambda *_: None)
    retain.export_run(tmp_path / "runs" / "ln_tuning", tmp_path / "ln.safetensors")
    names = set(load_file(str(tmp_path / "ln.safetensors")))
    assert names and all(n.startswith("head.heads.") or ".ln_" in n or n == "ln_keys" for n in names)
    assert not any(n.startswith("ln_fake_head.") for n in names)  # training only
    run(_config(tiny, png_root, "linear_probe"), log=lambda *_: None)
    retain.export_run(tmp_path / "runs" / "linear_probe", tmp_path / "lp.safetensors")
    assert set(load_file(str(tmp_path / "lp.safetensors"))) == {f"head.heads.{t}.{p}" for t in (0, 1)
                                                                 for p in ("weight", "bias")}  # fmt: skip


def test_cli_export_and_predict_with_json(tiny, tmp_path, png_root, capsys):
    run(_config(tiny, png_root, "finetune"), log=lambda *_: None)
    art = tmp_path / "m.safetensors"
    assert main(["export", str(tmp_path / "runs" / "finetune"), "-o", str(art)]) == 0
    assert "finetune on vit_nano_patch4_32" in capsys.readouterr().out
    assert main(["predict", str(art), str(png_root / "test" / "class0"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 6 and set(out[0]) == {"file", "label", "name", "task"}
    assert main(["predict", str(art), out[0]["file"]]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{out[0]['file']}\t{out[0]['name']}"


def test_a_tampered_artefact_or_another_backbone_is_refused(tiny, tmp_path, png_root, capsys):
    run(_config(tiny, png_root, "finetune"), log=lambda *_: None)
    art = tmp_path / "m.safetensors"
    meta = retain.export_run(tmp_path / "runs" / "finetune", art)
    tensors = load_file(str(art))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    assert main(["predict", str(tmp_path / "bad.safetensors"), str(png_root)]) == 2
    bad = tmp_path / "bad.safetensors"
    expected = f"retain: error: {bad} is corrupt: its tensors do not match their sha256; export it again"
    assert capsys.readouterr().err.strip() == expected
    run(_config(tiny, png_root, "linear_probe"), log=lambda *_: None)  # the artefact needs its frozen backbone
    meta = retain.export_run(tmp_path / "runs" / "linear_probe", art)
    config = json.loads(meta["config"])
    config["seed"] = 1  # another random backbone than the one the run used
    save_file(load_file(str(art)), str(tmp_path / "other.safetensors"), metadata=meta | {"config": json.dumps(config)})
    assert main(["predict", str(tmp_path / "other.safetensors"), str(png_root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one other.safetensors was made on" in err[0] and "--weights FILE" in err[0]


def test_export_needs_a_finished_task(tiny, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err


def test_export_refuses_when_the_backbone_changed_since_the_run(tiny, tmp_path, png_root, capsys):
    weights = tmp_path / "backbone.safetensors"
    src = create_backbone("vit_nano_patch4_32", pretrained=False, depth=1, embed_dim=32, num_heads=2, img_size=16)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    cfg = load_config(None, tiny(name="w", **{"model.weights": str(weights), "model.pretrained": "true"}))
    run(cfg, log=lambda *_: None)
    save_file({k: v.contiguous() + 1 for k, v in src.state_dict().items()}, str(weights))  # another file there now
    assert main(["export", str(tmp_path / "runs" / "w"), "-o", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"retain: error: cannot rebuild the model {tmp_path / 'runs' / 'w'} started from (backbone.")
    assert err.endswith("pass the run's backbone file with --weights FILE")
