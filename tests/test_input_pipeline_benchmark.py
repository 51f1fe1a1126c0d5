"""The input-pipeline benchmark (``python -m benchmarks.input_pipeline``): one row per distinct train transform of
the paper presets, and a quick run on a tiny configuration that writes positive numbers and the workers needed."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks import input_pipeline  # noqa: E402
from retain.config import preset_names  # noqa: E402


def test_every_paper_preset_lies_in_exactly_one_row():
    rows = input_pipeline.build_rows(list(input_pipeline.FAMILIES))
    listed = sorted(p for r in rows for p in r.presets)
    assert listed == sorted(p for p in preset_names() if p.split("/")[0] in input_pipeline.FAMILIES)
    by_rep = {r.representative: r for r in rows}
    assert sorted(by_rep["ln_tuning/imagenet_r"].presets) == ["ln_tuning/imagenet_r", "ln_tuning/imagenet_r_fast"]
    assert by_rep["ln_tuning/imagenet_r"].source == "imagenet_r" and by_rep["confit/cifar100"].source == "array32"
    assert len(by_rep["pad/imagenet32_lwf"].presets) == 7  # the base preset (no `defaults:`) represents its row


def test_quick_run_writes_a_row_per_preset_with_the_workers_needed(tmp_path, capsys):
    out = tmp_path / "input_pipeline.json"
    argv = ["--quick", "--presets", "confit/cub200", "pad/imagenet32_lwf", "--batch", "8", "--out", str(out)]
    assert input_pipeline.main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["representative"] for r in res["rows"]] == ["confit/cub200", "pad/imagenet32_lwf"]
    assert res["settings"]["workers"] == [0, 1] and res["machine"]["cores"] >= 1
    for row in res["rows"]:
        assert [w["workers"] for w in row["by_workers"]] == [0, 1]
        for w in row["by_workers"]:
            assert w["retain_img_s"] > 0 and w["plain_img_s"] > 0 and w["ratio_img_s"] > 0
        assert row["by_workers"][1]["image_shape"] == ([3, 224, 224] if row["source"]["jpeg"] else [3, 32, 32])
        per_worker = row["per_worker_img_s"]
        assert per_worker == row["by_workers"][1]["retain_img_s"] and row["in_process_img_s"] > 0
        expected = {f"{name} @{target}": math.ceil(target / per_worker) for name, target in
                    input_pipeline.TARGETS.items()}  # fmt: skip
        assert row["workers_needed"] == expected
    table = capsys.readouterr().out
    assert "| confit/cub200 | JPEG, CUB-like" in table and "| pad/imagenet32_lwf | uint8 array" in table
