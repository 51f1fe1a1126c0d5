"""The benchmark suite's machinery: interleaved timing, the CPU memory probe, the results table, the README update."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed
from benchmarks import common, table  # noqa: E402
from benchmarks.run import machine_slug  # noqa: E402

RESULTS = {
    "schema": 1, "command": "python -m benchmarks", "size": "small", "date": "2026-11-29T22:00:00+00:00",
    "machine": {"cpu": "AMD EPYC", "cores": 2, "cpu_capability": "AVX2", "torch": "2.14.1", "threads": 1, "gpu": None,
                "load_before": 2.5, "load_after": 3.25},
    "scripts": {
        "method_costs": {
            "settings": {"batch": 16, "rounds": 5}, "memory_calibration_64mib": 67108864,
            "aa_control": {"train": 1.013, "inference": 0.987},
            "rows": [
                {"method": "lora", "protocol": "task_il", "backbone": "vit", "stage": "train", "inputs": "images",
                 "trainable": 9482, "reference": "every bias and LayerNorm of the blocks + head",
                 "ref_trainable": 6000, "train_img_s": 250.0, "ref_train_img_s": 270.0, "train_ratio": 0.926,
                 "peak_mib": 20.5, "ref_peak_mib": 20.0, "memory_ratio": 1.025, "infer_img_s": 900.0,
                 "ref_infer_img_s": 905.0, "infer_ratio": 0.994, "storage_bytes_per_task": 33800,
                 "storage_new_elements": 8450, "storage_new_bytes": 33800, "storage_ratio": 1.0},
                {"method": "simplecil", "protocol": "class_il", "backbone": "vit", "infer_img_s": 1000.0,
                 "ref_infer_img_s": 1010.0, "infer_ratio": 0.99, "storage_bytes_per_task": 1024,
                 "storage_new_elements": 258, "storage_new_bytes": 1032, "storage_ratio": 1024 / 1032},
            ],
        },
        "pad_overhead": {"rows": [{"variant": "lwf", "step_s": 0.1, "ratio": 1.0},
                                  {"variant": "pad asym functional", "step_s": 0.102, "ratio": 1.02}]},
        "peft_vit_speed": {"error": "RuntimeError: boom"},
    },
}  # fmt: skip


def test_time_interleaved_rotates_and_counts():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = common.time_interleaved(fns, rounds=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")  # warm-up, then each round starts one later
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert common.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 1.0]) == 4.0


PEAK_CHILD = """
import torch
from benchmarks.common import peak_rss
print(peak_rss(lambda: None), peak_rss(lambda: torch.ones(8 * 2**20).sum()), peak_rss(lambda: None))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_rss_sees_a_tensor_allocated_and_freed_inside():
    # in a child: the probe changes glibc's malloc settings for the rest of its process
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD], cwd=root, capture_output=True, text=True, check=True)
    idle, tensor, after = (int(v) for v in out.stdout.split())
    assert idle < 2 * 2**20 and after < 2 * 2**20  # nothing allocated: (almost) nothing seen; and it was given back
    assert 31 * 2**20 <= tensor <= 40 * 2**20  # 32 MiB, freed before the call returned


def test_table_renders_every_measured_number():
    text = table.render(RESULTS)
    assert "AMD EPYC, 2 cores (AVX2), load average 2.5 -> 3.2, torch 2.14.1, 1 thread(s)" in text
    assert "`python -m benchmarks`" in text and "64 MiB tensor measured 64.0 MiB" in text
    assert "A/A control (1.00 on a quiet machine): train 1.01x, inference 0.99x" in text
    lora = next(line for line in text.splitlines() if line.startswith("| lora "))
    for cell in ("9,482 / 6,000", "250 (0.93x)", "20.5 (1.02x)", "900 (0.99x)", "33,800 (1.00)"):
        assert cell in lora
    simplecil = next(line for line in text.splitlines() if line.startswith("| simplecil "))
    assert "no gradient step" in simplecil and "1,024 (0.99)" in simplecil
    assert "| pad_overhead | pad asym functional step vs LwF step" in text and "1.020 |" in text
    assert "Failed: peft_vit_speed: RuntimeError: boom" in text


def test_update_replaces_only_the_marked_section(tmp_path):
    results, readme = tmp_path / "r.json", tmp_path / "README.md"
    results.write_text(json.dumps(RESULTS))
    readme.write_text(f"# x\nbefore\n{table.START}\nold table\n{table.END}\nafter\n")
    assert table.main([str(results), "--update", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{table.END}\nafter\n") and "old table" not in text
    assert table.render(RESULTS) in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        table.main([str(results), "--update", str(readme)])


def test_machine_slug():
    assert machine_slug({"cpu": "AMD EPYC", "cores": 2}) == "amd-epyc-2c"
    xeon = {"cpu": "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", "cores": 16}
    assert machine_slug(xeon) == "intel-xeon-e5-2680-v4-16c"


class _Script:
    """A stand-in for a benchmark module: records the argv the suite passes, or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.argv = fail, None

    def collect(self, argv):
        self.argv = argv
        if self.fail:
            raise RuntimeError("no luck")
        return {"rows": [{"variant": "lwf", "step_s": 0.1, "ratio": 1.0}]}


def test_suite_writes_one_results_file_and_keeps_going_after_a_failure(tmp_path, monkeypatch):
    from benchmarks import run

    scripts = {"benchmarks.pad_overhead": _Script(), "benchmarks.ln_tuning_speed": _Script(fail=True)}
    monkeypatch.setattr(run.importlib, "import_module", scripts.__getitem__)
    out = tmp_path / "perf.json"
    assert run.main(["--only", "ln_tuning_speed", "pad_overhead", "--out", str(out)]) == 1  # one script failed
    res = json.loads(out.read_text())
    assert res["schema"] == 1 and res["size"] == "small" and res["machine"]["cores"] >= 1
    assert res["command"] == f"python -m benchmarks --only ln_tuning_speed pad_overhead --out {out}"
    assert scripts["benchmarks.pad_overhead"].argv == ["--small", "--threads", "1"]
    assert res["scripts"]["ln_tuning_speed"]["error"] == "RuntimeError: no luck"
    assert res["scripts"]["pad_overhead"]["rows"][0]["ratio"] == 1.0
    assert res["scripts"]["pad_overhead"]["command"] == "python benchmarks/pad_overhead.py --small --threads 1"
    assert "Failed: ln_tuning_speed" in table.render(res)


@pytest.mark.parametrize("script", ["pad_overhead", "ln_tuning_speed", "peft_vit_speed"])
def test_the_timing_scripts_run_against_the_current_api(script):
    """One round at the smallest size: a script that no longer runs (an API it calls changed) fails here, not in
    the suite run that regenerates the README table."""
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    out = module.collect(["--small", "--rounds", "1", "--warmup", "0", "--batch", "4"])
    assert out["rows"] and all(r.get("ratio", 1.0) > 0 for r in out["rows"])


def test_the_input_pipeline_scripts_run(tmp_path):
    """``benchmarks.device_resize`` and ``benchmarks.workers_cpu`` at their smallest: they still run and measure."""
    from benchmarks import device_resize, workers_cpu

    out = device_resize.collect(["--small", "--images", "8", "--timing-images", "4", "--batch", "4", "--rounds", "1",
                                 "--image-size", "64", "--out", str(tmp_path / "d.json")])  # fmt: skip
    assert out["rows"] and all(r["ratio"] > 0 for r in out["rows"])
    res = workers_cpu.main(["--quick", "--workers", "0", "1", "--out", str(tmp_path / "w.json")])
    assert [r["workers"] for r in res["rows"]] == [0, 1] and res["rows"][0]["ratio"] == 1.0
    assert all(r["seconds"] > 0 for r in res["rows"])
