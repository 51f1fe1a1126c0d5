"""The prompt-cost benchmark (``benchmarks/prompt_cost.py --quick``): one row per method, LN tuning the reference,
and the 2 forward passes per image of every prompt method at training and at inference (PROMPTS.md §5.2)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks import prompt_cost  # noqa: E402


def test_quick_run_writes_every_method_and_two_passes_per_prompt_method(tmp_path, capsys):
    out = tmp_path / "prompt_cost.json"
    assert prompt_cost.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == list(prompt_cost.VARIANTS)
    assert res["settings"]["rounds"] == 2 and res["settings"]["query_cache"] is False
    for name in prompt_cost.PROMPT_METHODS:
        assert rows[name]["train_forward_per_image"] == 2 and rows[name]["infer_forward_per_image"] == 2, name
        assert rows[name]["stage"] == "train" and 0 < rows[name]["query_share"], name
    ref = rows[prompt_cost.REF]
    assert ref["stage"] == "ln" and ref["train_ratio"] == ref["infer_ratio"] == 1.0
    assert ref["train_forward_per_image"] == 1 and ref["infer_forward_per_image"] == 2  # oracle rows; query + routed
    assert rows["ln_tuning (single stage)"]["infer_forward_per_image"] == 1
    assert rows["ln_tuning (single stage)"]["query_share"] is None
    for r in rows.values():
        assert r["train_ms"] > 0 and r["infer_ms"] > 0 and r["query_ms"] > 0 and r["trainable"] > 0
    printed = capsys.readouterr().out.splitlines()
    table = [line for line in printed if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == list(prompt_cost.VARIANTS)
