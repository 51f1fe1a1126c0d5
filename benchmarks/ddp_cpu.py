"""Multi-process training on this CPU: 2 processes x 1 thread (torchrun, gloo, DDP) against 1 process x 2 threads,
the same run (finetune, global batch, steps, data) side by side; prints the training throughput of each (images per
second of ``fit_task``, from ``metrics.json``'s ``task_time_s``) and their ratio. Rounds alternate the order.

The ratio is honest, not a goal: on a CPU two processes pay gloo's all-reduce of every gradient and compete for
the same cores, where one process's two threads share one copy of the model; below 1 is a fair outcome here. The
point of multi-process training is several GPUs (README: "Multi-GPU and multi-node").

    nice -n 10 python benchmarks/ddp_cpu.py                   # vit_micro_patch4_32, 32 px, batch 64, 40 steps
    python benchmarks/ddp_cpu.py --steps 80 --rounds 3 --backbone vit_tiny_patch4_32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def overrides(args: argparse.Namespace, name: str, out: Path, threads: int) -> list[str]:
    """A one-task fine-tuning run of ``args.steps`` steps of ``args.batch`` images on random 32 px data."""
    return [f"out_dir={out}", f"name={name}", "data.name=synthetic", "scenario.protocol=finetune",
            "data.options={n_classes: 10, n_per_class: 400, n_test_per_class: 10, image_size: 32}",
            f"model.backbone={args.backbone}", "model.pretrained=false", "method.name=finetune",
            f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.eval_batch_size=100",
            f"train.threads={threads}", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
            "checkpoint=false", "run.checkpoint_every=off"]  # fmt: skip


def run_pair(args: argparse.Namespace, out: Path, round_: int) -> dict[str, float]:
    base = out / "base.yaml"
    base.write_text("name: base\n")
    runs = {
        "1 process x 2 threads": [sys.executable, "-m", "retain", "run", str(base)],
        "2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   "2", "-m", "retain", "run", str(base)],
    }  # fmt: skip
    order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
    result = {}
    for label in order:
        name = f"r{round_}_{'one' if label.startswith('1') else 'two'}"
        threads = 2 if label.startswith("1") else 1
        subprocess.run(runs[label] + overrides(args, name, out, threads), check=True, capture_output=True,
                       env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
        record = json.loads((out / name / "metrics.json").read_text())
        result[label] = args.steps * record["distributed"]["global_batch"] / record["task_time_s"][0]
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_micro_patch4_32")
    p.add_argument("--batch", type=int, default=64, help="global batch (each of 2 processes takes half)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--small", action="store_true", help="the suite's size: 20 steps, 2 rounds")
    p.add_argument("--threads", type=int, default=None, help="ignored: the comparison fixes 2x1 and 1x2 (suite)")
    args = p.parse_args(argv)
    if args.small:
        args.steps = 20
    return args


def collect(argv: list[str] | None = None) -> dict:
    """Median img/s of each setting and the median per-round ratio 2x1 / 1x2 (results-file entry)."""
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [run_pair(args, Path(tmp), r) for r in range(args.rounds)]
    img_s = {label: statistics.median(r[label] for r in rounds) for label in rounds[0]}
    ratios = [r["2 processes x 1 thread"] / r["1 process x 2 threads"] for r in rounds]
    settings = {k: getattr(args, k) for k in ("backbone", "batch", "steps", "rounds")} | {"cpus": os.cpu_count()}
    row = {"case": "2 processes x 1 thread vs 1 process x 2 threads", "ratio": statistics.median(ratios),
           "rounds": ratios, "img_s": img_s}  # fmt: skip
    return {"settings": settings, "ratio": "img/s of 2 processes x 1 thread / img/s of 1 process x 2 threads",
            "rows": [row]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    res = collect(argv)
    s, row = res["settings"], res["rows"][0]
    print(f"{s['backbone']}, 32 px, global batch {s['batch']}, {s['steps']} SGD steps per run, {s['rounds']} rounds; "
          f"{s['cpus']} logical CPUs")  # fmt: skip
    for label, value in sorted(row["img_s"].items()):
        print(f"{label:>24s}: {value:7.1f} img/s")
    listed = ", ".join(f"{v:.2f}" for v in row["rounds"])
    print(f"{'ratio 2x1 / 1x2':>24s}: {row['ratio']:.2f}  (rounds: {listed})")


if __name__ == "__main__":
    main()
