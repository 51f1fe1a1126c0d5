"""End to end on a slice of the real CIFAR-10 (JPEG copy in ../shared) with the real pre-trained ResNet-20."""

import pytest

from retain.config import load_config
from retain.engine import run

from conftest import needs_shared


@pytest.mark.shared
def test_simplecil_and_finetune_on_a_real_cifar10_slice(tmp_path):
    archive = needs_shared("cifar10-jpg.tar.gz")
    weights = needs_shared("weights", "resnet20-12fca82f.th")
    common = [
        f"out_dir={tmp_path}", "data.name=cifar10", f"data.root={archive}",
        "scenario.use_tasks=2", "scenario.class_order=[0,1,2,3,4,5,6,7,8,9]", "scenario.classes_per_task=2",
        "scenario.n_tasks=5", "scenario.train_fraction=0.02", "scenario.test_fraction=0.1",
        "model.backbone=cifar_resnet20", "model.pretrained=false", f"model.weights={weights}",
        "train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.batch_size=32",
    ]  # fmt: skip
    proto = run(load_config(None, [*common, "name=proto", "method.name=simplecil"]), log=lambda *_: None)
    # airplane/automobile then bird/cat, 100 test images per class: CIFAR-10 features separate them well
    assert proto["accuracy_matrix"][0][0] >= 85.0
    assert min(proto["accuracy_matrix"][1]) >= 60.0
    ft = run(load_config(None, [*common, "name=ft", "method.name=finetune", "train.epochs=2"]), log=lambda *_: None)
    assert ft["finished_tasks"] == 2
    # class-incremental fine-tuning without any protection forgets the first task
    assert ft["metrics"]["forgetting"] > 20.0
