"""Same seed and config on the same machine and thread count -> identical accuracy matrices and weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from retain.config import load_config
from retain.engine import run
from retain.methods import method_names

from conftest import CONFIT_CNN


@pytest.mark.parametrize("method", method_names())
def test_two_runs_of_one_config_are_identical(tiny, tmp_path, method):
    extra = CONFIT_CNN if method == "confit" else {}  # a CNN method: the tiny ResNet setting
    over = tiny(**{"method.name": method, "train.epochs": "2", "data.augment": "crop_flip"} | extra)
    for name in ("a", "b"):
        run(load_config(None, over + [f"name={name}"]), log=lambda *_: None)
    runs = tmp_path / "runs"
    a, b = (json.loads((runs / n / "metrics.json").read_text()) for n in "ab")
    assert a["matrices"] == b["matrices"] and a["retention_knn"] == b["retention_knn"]
    wa, wb = (load_file(str(runs / n / "checkpoints" / "task_001.safetensors")) for n in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
