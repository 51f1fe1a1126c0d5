"""The prompt study (``benchmarks/prompt_study.py --quick``): one engine run per method on the demo's real stream,
one row each with every column of the table, written to JSON and printed."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks import prompt_study  # noqa: E402


@pytest.mark.filterwarnings("ignore:dualprompt. the backbone has 4 blocks")  # the demo ViT: E blocks [2, 3]
def test_quick_study_of_a_prompt_method_and_finetune(tmp_path, capsys):
    out = tmp_path / "prompt_study.json"
    assert prompt_study.main(["--quick", "--methods", "dualprompt", "finetune", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] is True and res["settings"]["n_tasks"] == 2 and res["settings"]["epochs"] == 1
    assert res["settings"]["dataset"] == "digits" and res["settings"]["protocol"] == "class_il"
    assert res["settings"]["backbone"] == "vit_micro_patch4_32.retain_cifar10"
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["dualprompt", "finetune"]
    assert rows["dualprompt"]["lr"] == prompt_study.PROMPT_LR and rows["finetune"]["lr"] == 0.0005
    for r in rows.values():
        assert set(prompt_study.COLUMNS) <= set(r)
        assert 0 <= r["average_accuracy"] <= 100 and math.isfinite(r["forgetting"])
        assert math.isfinite(r["forgetting_step_drop"]) and len(r["accuracy_matrix"]) == 2
        assert r["trainable_params"] > 0 and r["bytes_per_task"] > 0
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and r["train_images"] > 0
    assert 0 <= rows["dualprompt"]["task_id_accuracy_final"] <= 100  # its E-prompt selection
    assert 0 <= rows["dualprompt"]["task_id_accuracy"] <= 100  # the mean over the steps
    assert rows["finetune"]["task_id_accuracy"] is None and rows["finetune"]["task_id_accuracy_final"] is None
    assert rows["dualprompt"]["trainable_params"] < rows["finetune"]["trainable_params"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(prompt_study.COLUMNS.values()) + " |"
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == ["dualprompt", "finetune"]
