"""The offline demo and the backbones shipped inside the package (issue: `retain demo` on a laptop CPU)."""

import json

import pytest
import timm
import torch

from retain.cli import main
from retain.config import load_config
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
    from retain.data import build_transform, create_dataset

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


def test_demo_end_to_end_reduced(tmp_path, capsys):
    code = main(["demo", "--methods", "finetune", "simplecil", "--epochs", "1", "--tasks", "2",
                 "--train-fraction", "0.25", "--out-dir", str(tmp_path), "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "| finetune" in out and "| simplecil" in out and "next:" in out
    runs = [p for p in tmp_path.iterdir() if (p / "metrics.json").exists()]
    assert len(runs) == 2
    assert (tmp_path / "report" / "report.md").exists()


def test_demo_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--methods" in out and "--epochs" in out and "--dataset" in out
