"""``retain sweep --jobs 2`` against ``--jobs 1`` on this CPU: the same 4-run sweep (the offline demo preset, seeds
0-3, a quarter of each task's train set, one epoch, ``train.threads=1``) run one after another in one process, then
two at a time in their own processes, into two temporary folders. Prints both wall times (the whole ``retain sweep``
command, process start-up included), their ratio, the machine's load before and after, and whether every run's
accuracy matrix is identical in both sweeps (it must be: the same configs, one thread each).

    python benchmarks/sweep_jobs.py              # 4 runs (seed=0,1,2,3)
    python benchmarks/sweep_jobs.py --fraction 1 --epochs 3   # longer runs: start-up weighs less
    python benchmarks/sweep_jobs.py --small      # 2 runs, 2 tasks of the synthetic stream (a smoke check)

Each run of ``--jobs 2`` is a process of its own and pays its start-up (imports, data, model: about 5 s here), which
the sequential sweep pays once; the CPU seconds printed show it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def overrides(small: bool, fraction: float = 0.25, epochs: int = 1) -> list[str]:
    base = [f"train.epochs={epochs}", "train.threads=1", "train.progress=false", "train.tensorboard=false",
            "train.device=cpu"]  # fmt: skip
    if not small:
        return ["seed=0,1,2,3", f"scenario.train_fraction={fraction}", *base]
    return ["seed=0,1", "data.name=synthetic", "scenario.n_tasks=2", "data.image_size=16", "model.pretrained=false",
            "data.options={n_classes: 4, n_per_class: 12, n_test_per_class: 6, image_size: 16}",
            "model.backbone=vit_nano_patch4_32", "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2, img_size: 16}",
            *base]  # fmt: skip


def sweep(out: Path, jobs: int, args: argparse.Namespace) -> tuple[float, float]:
    """(wall seconds, CPU seconds of it and its runs) of ``retain sweep demo/default ... --jobs N --out OUT``."""
    over = overrides(args.small, args.fraction, args.epochs)
    argv = [sys.executable, "-m", "retain", "sweep", "demo/default", *over, "--out", str(out)]
    argv += ["--jobs", str(jobs)] if jobs > 1 else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"--jobs {jobs} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def matrices(sweep_dir: Path) -> dict[str, list]:
    index = json.loads((sweep_dir / "sweep.json").read_text())
    return {r["name"]: json.loads((sweep_dir / r["name"] / "metrics.json").read_text())["accuracy_matrix"]
            for r in index["runs"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="2 tiny runs on synthetic data: checks the path, not speed")
    p.add_argument("--fraction", type=float, default=0.25, help="scenario.train_fraction of the 4 runs (0.25)")
    p.add_argument("--epochs", type=int, default=1, help="train.epochs of the 4 runs (1)")
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        one, cpu_one = sweep(Path(tmp) / "jobs1", 1, args)
        two, cpu_two = sweep(Path(tmp) / "jobs2", 2, args)
        a, b = matrices(Path(tmp) / "jobs1"), matrices(Path(tmp) / "jobs2")
    differ = sorted(n for n in a if a[n] != b.get(n))
    print(f"cpus {os.cpu_count()}, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))  # fmt: skip
    print(f"--jobs 1: {one:.1f} s ({cpu_one:.1f} CPU s); --jobs 2: {two:.1f} s ({cpu_two:.1f} CPU s); "
          f"speed-up {one / two:.2f}x ({len(a)} runs)")  # fmt: skip
    print("accuracy matrices: " + ("all identical" if not differ and a.keys() == b.keys() else f"differ: {differ}"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
