"""The offline demo, the backbones and the CIFAR-10 sample shipped inside the package (`retain demo` on a CPU)."""

import json

import numpy as np
import pytest
import timm
import torch

from retain.cli import main
from retain.config import load_config
from retain.data import create_dataset
from retain.data.samples import CIFAR10_SAMPLE, _content_sha256, load_sample
from retain.demo import STREAMS, VERDICTS
from retain.engine import run
from retain.models.vit import WEIGHTS_DIR
from retain.pretrain import sha256_of

from conftest import needs_shared

CARDS = sorted(WEIGHTS_DIR.glob("*.json"))
SHIPPED = ["vit_micro_patch4_32.retain_cifar10", "cifar_resnet20.retain_cifar10"]


def test_both_backbones_are_shipped_small_and_match_their_cards():
    assert sorted(c.stem for c in CARDS) == sorted(SHIPPED)
    total = 0
    for card_path in CARDS:
        card = json.loads(card_path.read_text())
        weights = WEIGHTS_DIR / card["file"]
        assert sha256_of(weights) == card["sha256"], f"{weights} does not match its card"
        total += weights.stat().st_size
        model = timm.create_model(card["tag"], pretrained=True)  # loads the shipped file, no network
        assert model.num_classes == 10
        assert card["dataset"] == "cifar10" and card["epochs"] > 0 and 0 < card["test_accuracy"] <= 100
    assert total <= 8 * 2**20


@pytest.mark.parametrize("tag", SHIPPED)
def test_shipped_backbone_reproduces_its_card_accuracy_on_cifar10(tag):
    archive = needs_shared("cifar10-jpg.tar.gz")
    from retain.data import build_transform

    card = json.loads((WEIGHTS_DIR / f"{tag}.json").read_text())
    model = timm.create_model(tag, pretrained=True).eval()
    cfg = model.pretrained_cfg
    tf = build_transform(False, 32, cfg["mean"], cfg["std"])
    test = create_dataset("cifar10", "test", root=archive)
    idx = range(0, len(test), 5)  # 2,000 of the 10,000 test images
    x = torch.stack([tf(test.load(i)) for i in idx])
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    acc = 100.0 * (pred.numpy() == test.targets[list(idx)]).mean()
    assert abs(acc - card["test_accuracy"]) < 2.5, (acc, card["test_accuracy"])


def _probe(tmp_path, pretrained: bool) -> float:
    over = [f"out_dir={tmp_path}", f"name=probe-{pretrained}", "scenario.protocol=finetune",
            "method.name=linear_probe", f"model.pretrained={str(pretrained).lower()}", "train.epochs=30",
            "train.optimizer=adam", "train.lr=0.01", "train.batch_size=64", "train.progress=false",
            "train.tensorboard=false"]  # fmt: skip
    return run(load_config("demo/default", over), log=lambda *_: None)["accuracy_matrix"][0][0]


def test_pretrained_vit_beats_random_init_on_a_digits_linear_probe(tmp_path):
    pre, rand = _probe(tmp_path, True), _probe(tmp_path, False)
    assert pre >= rand + 25.0, (pre, rand)  # measured 90.6 vs 41.7


def test_cifar10_sample_is_small_stratified_and_matches_its_card():
    card = json.loads(CIFAR10_SAMPLE.with_suffix(".json").read_text())
    assert sha256_of(CIFAR10_SAMPLE) == card["sha256"] and CIFAR10_SAMPLE.stat().st_size <= 3 * 10**6
    arrays = load_sample()  # np.load(allow_pickle=False), sha256 checked against the card
    assert _content_sha256(arrays) == card["content_sha256"]
    for split in ("train", "test"):
        data = create_dataset("cifar10_sample", split)
        assert data.images.shape == (500, 32, 32, 3) and data.images.dtype == np.uint8
        assert np.bincount(data.targets).tolist() == [50] * 10 and len(card["indices"][split]) == 500
        assert data.classes[0] == "airplane" and len(create_dataset("cifar10_sample", split, per_class=3)) == 30
    assert "Krizhevsky" in card["licence"] and card["command"].startswith("python benchmarks/build_cifar10_sample.py")


def test_cifar10_sample_holds_the_indexed_cifar10_images():
    archive = needs_shared("cifar10-jpg.tar.gz")
    card = json.loads(CIFAR10_SAMPLE.with_suffix(".json").read_text())
    for split in ("train", "test"):
        full, sample = create_dataset("cifar10", split, root=archive), create_dataset("cifar10_sample", split)
        idx = card["indices"][split]
        assert np.array_equal(full.images[idx], sample.images) and np.array_equal(full.targets[idx], sample.targets)


def _row(label, method, acc, fgt, group="", **extra):
    return {"label": label, "method": method, "average_accuracy": acc, "forgetting": fgt, "group": group, **extra}


def test_verdicts_are_drawn_from_the_numbers():
    rows = [_row("finetune", "finetune", 22.5, 87.2), _row("SimpleCIL", "simplecil", 71.9, 9.8),
            _row("LwF", "lwf", 29.7, 60.8), _row("joint (upper bound)", "joint", 97.5, 1.0)]  # fmt: skip
    assert VERDICTS["class_il"](rows) == ("SimpleCIL ends highest (71.9 % avg acc; joint upper bound 97.5 %) and "
                                          "forgets least (9.8 points); finetune forgets most (87.2).")  # fmt: skip
    rows = [_row("finetune", "finetune", 92.0, 8.2, "ResNet-20", tag_average_accuracy=43.8),
            _row("ConFiT", "confit", 95.0, 3.8, "ResNet-20", tag_average_accuracy=41.9),
            _row("LwF", "lwf", 96.4, 4.5, "ViT"), _row("PAD", "pad", 96.0, 6.0, "ViT")]  # fmt: skip
    text = VERDICTS["task_il"](rows)
    assert text.startswith("ResNet-20: ConFiT forgets less than finetune (3.8 vs 8.2 points) and ends at 95.0 vs")
    assert "41.9 vs 43.8 % TAg" in text and "ViT: PAD forgets more than LwF (6.0 vs 4.5 points)" in text
    knn = [("full", 90.8, -20.4), ("linear", 78.3, 0.0), ("lora", 94.7, -5.8), ("block", 91.9, -1.6)]
    rows = [_row(n, n, a, 0.0, retention_before=58.2, retention_after=58.2 + c, retention_change=c) for n, a, c in knn]
    text = VERDICTS["retention"](rows)
    assert text.startswith("full loses the most of CIFAR-10 (k-NN 58.2 -> 37.8) while lora (94.7 %, k-NN -5.8) and ")
    assert "linear keeps the most (k-NN +0.0) at 78.3 % on digits" in text


def test_demo_runs_every_stream_and_prints_tables_and_verdicts(tmp_path, capsys):
    # --quick on 2 tasks, 10 % of the images, 4 steps per stage, a 3-per-class retention probe: every stream and method
    code = main(["demo", "--quick", "--tasks", "2", "--train-fraction", "0.1", "--test-fraction", "0.25", "--out-dir",
                 str(tmp_path), "--quiet", "--set", "train.steps=4", "train.warmup_steps=0", "train.threads=1",
                 "train.tensorboard=false", "checkpoint=false", "data.retention.options={per_class: 3}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    summary = out[out.index("# Summary") :]
    for name, stream in STREAMS.items():
        assert f"## {name}: {stream.title}" in summary
        for entry in stream.entries:
            assert (f"| {entry.label} |" in summary) != entry.full_only, entry.label  # --quick skips the ablations
    assert summary.count("verdict: ") == 3 and "| ResNet-20 | ConFiT |" in summary
    assert "| ViT | LwF + asym. PAD |" in summary and "CIFAR-10 k-NN before" in summary and "next:" in out
    assert "| CODA-P | 0.00375 |" in summary  # the prompt method of the class-IL stream, at its stated lr
    machine = summary.splitlines()[2]  # what the numbers depend on beyond the config
    assert machine.startswith("machine: ") and f"torch {torch.__version__}" in machine and "kernels)" in machine
    runs = [p for p in tmp_path.iterdir() if (p / "metrics.json").exists()]
    assert len(runs) == sum(not e.full_only for s in STREAMS.values() for e in s.entries)
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.count("**Verdict:**") == 3 and all((tmp_path / "report" / s / "report.md").exists() for s in STREAMS)
    knn = [json.loads((p / "metrics.json").read_text())["retention_knn"] for p in runs if "-retention-" in p.name]
    assert len(knn) == 4 and all(len(k) == 2 for k in knn)


def test_demo_methods_make_one_custom_stream(tmp_path, capsys):
    args = "--methods simplecil --tasks 2 --test-fraction 0.25 --quiet --set train.threads=1 checkpoint=false"
    code = main(["demo", *args.split(), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "| simplecil |" in out and out.count("verdict: ") == 2  # the stream, then the summary
    assert len([p for p in tmp_path.iterdir() if (p / "metrics.json").exists()]) == 1


def test_demo_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--stream", "--quick", "--methods", "--epochs", "--dataset"))


def test_ctrl_c_in_the_demo_says_where_runs_are_and_how_to_finish_the_interrupted_one(tmp_path, capsys, monkeypatch):
    import retain.engine
    from retain.engine.context import RunInterrupted

    def interrupted(cfg, **kwargs):
        raise RunInterrupted("stopped at task 0, stage 'train', epoch 1, batch 3 (step 3); checkpoint saved in X")

    monkeypatch.setattr(retain.engine, "run", interrupted)
    code = main(["demo", "--methods", "lwf", "--quiet", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 130 and err.startswith("retain: interrupted: stopped at task 0, stage 'train'")
    assert f"the finished demo runs are kept in {tmp_path}" in err
    again = err.split("finish this one with: ")[1].split()
    assert again[:4] == ["retain", "run", "demo/default", "method.name=lwf"] and again[-1] == "--resume"
    assert f"out_dir={tmp_path}" in again and any(a.startswith("name=") and a.endswith("-class_il-lwf") for a in again)
