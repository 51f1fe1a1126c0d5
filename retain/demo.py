"""``retain demo``: the project's own pre-trained ViT continually fine-tuned on a small stream, offline, on a CPU.

Runs each method on the same class-incremental stream (default: scikit-learn's digits upsampled to 32x32 RGB,
5 tasks x 2 classes, seed 0), prints every accuracy matrix and a final table, and writes the run directories.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from retain.config import load_config

__all__ = ["DEMO_METHODS", "add_demo_arguments", "demo", "demo_from_args"]

# the default set runs in 3m19s on a quiet 2-core CPU (measured); add ln_tuning with --methods ... ln_tuning
DEMO_METHODS = ["finetune", "linear_probe", "simplecil", "lwf", "pad", "ewc", "block_expansion", "lora", "joint"]
# per-method settings on top of demo/default: a head on cached features needs a larger step and costs little
# LN rows move little at the full-fine-tuning lr; 0.005 is the LN-tuning paper's effective ImageNet-R lr
# finetune: FACIL's (current head only, old heads frozen), the baseline LwF, PAD and EWC each add terms to
DEMO_OVERRIDES = {
    "finetune": ["method.train_mask=current"],
    "linear_probe": ["train.lr=0.01", "train.epochs=10"],
    "ln_tuning": ["train.lr=0.005"],
    "lora": ["train.lr=0.005"],  # docs/peft_vit.md: 46.4 % vs 20.0 % at the finetune lr on this stream
}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=DEMO_METHODS, help=f"methods to compare (default: {DEMO_METHODS})")
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the preset's)")
    p.add_argument("--dataset", default="digits", help="digits (default), fashion_mnist (Debian package), synthetic")
    p.add_argument("--tasks", type=int, default=5, help="number of tasks (default 5)")
    p.add_argument("--train-fraction", type=float, default=None, help="fraction of each task's train set to use")
    p.add_argument("--test-fraction", type=float, default=None, help="fraction of each task's test set to use")
    p.add_argument("--out-dir", default="runs/demo", help="where run directories go (default runs/demo)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def demo(methods: list[str], out_dir: str = "runs/demo", dataset: str = "digits", tasks: int = 5,
         epochs: int | None = None, train_fraction: float | None = None, extra: list[str] | None = None,
         quiet: bool = False, test_fraction: float | None = None) -> list[Path]:  # fmt: skip
    """Run ``methods`` on the demo stream; returns the run directories."""
    from retain.engine import run
    from retain.report import format_matrix

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dirs = []
    for i, method in enumerate(methods, 1):
        overrides = [f"method.name={method}", f"data.name={dataset}", f"scenario.n_tasks={tasks}",
                     f"out_dir={out_dir}", f"name={stamp}-{method}"]  # fmt: skip
        overrides += DEMO_OVERRIDES.get(method, [])
        overrides += [f"train.epochs={epochs}"] if epochs is not None else []
        overrides += [f"scenario.train_fraction={train_fraction}"] if train_fraction is not None else []
        overrides += [f"scenario.test_fraction={test_fraction}"] if test_fraction is not None else []
        overrides += [f"train.progress={not quiet}".lower()] + list(extra or [])
        cfg = load_config("demo/default", overrides)
        print(f"\n=== [{i}/{len(methods)}] {method} on {dataset} ({tasks} tasks, {cfg.model.backbone}) ===")
        record = run(cfg)
        print(format_matrix(record["accuracy_matrix"]))
        run_dirs.append(Path(out_dir) / cfg.name)
    return run_dirs


def demo_from_args(args: argparse.Namespace) -> int:
    from retain.report import summary_rows, to_markdown, write_report

    start = time.perf_counter()
    dirs = demo(args.methods, args.out_dir, args.dataset, args.tasks, args.epochs, args.train_fraction, args.set,
                args.quiet, args.test_fraction)  # fmt: skip
    print("\n" + to_markdown(summary_rows(dirs)))
    report = write_report(dirs, Path(args.out_dir) / "report")
    print(f"\nall runs: {time.perf_counter() - start:.0f}s; report: {report}")
    print(_next_steps(args.dataset))
    return 0


def _next_steps(dataset: str) -> str:
    """What to try after the demo, depending on what this machine has."""
    bigger = "retain demo --dataset fashion_mnist --train-fraction 0.05 --test-fraction 0.2"
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        bigger = f"apt-get install dataset-fashion-mnist, then {bigger}"
    lines = ["next:"]
    if dataset != "fashion_mnist":
        lines.append(f"  a bigger stream:   {bigger}")
    lines += [
        "  one method, your settings:   retain run demo/default method.name=lwf train.epochs=5 name=my-lwf",
        "  a paper preset (GPU):        retain list   then e.g.  retain run confit/cifar100 data.root=DIR",
        "  inspect a preset offline:    retain inspect confit/cifar100 --json",
    ]
    return "\n".join(lines)
