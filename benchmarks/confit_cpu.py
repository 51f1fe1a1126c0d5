"""CPU benchmark of ConFiT (Jie, Deng, Li, CVPRW 2022, arXiv 2204.10535) with real pre-trained CNN weights.

The CIFAR-10 ResNet-20 of He et al. (``../shared/data/weights/resnet20-12fca82f.th``) is fine-tuned on a stream it
was not trained on, task-incrementally (the task id is given at test time, one head per task), with plain SGD
(no momentum, no weight decay, a fresh optimiser per task) and four variants:

- ``finetune``: every parameter for E epochs (the library's baseline method);
- ``hierarchical``: ConFiT's schedule alone: head for E//5 epochs, + BN affine until E//2, then all;
- ``xconv_bn``: Xconv BN alone: all parameters for E epochs, per-task BN state with means recovered at test;
- ``confit``: both.

It prints a markdown table of the final average accuracy and the average forgetting (``retain.metrics``; max over
earlier rows minus last row), both in percent. The README's table came from the defaults (Split Fashion-MNIST,
2 % of the train and 20 % of the test images per class, E = 10, lr 0.01; about 10 minutes on 2 busy cores):

    PYTHONPATH=. nice -n 10 python benchmarks/confit_cpu.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from retain.config import load_config
from retain.engine import run

WEIGHTS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "weights" / "resnet20-12fca82f.th"
VARIANTS = {
    "finetune": ["method.name=finetune"],
    "hierarchical": ["method.name=confit", "method.hierarchical=true", "method.xconv_bn=false"],
    "xconv_bn": ["method.name=confit", "method.hierarchical=false", "method.xconv_bn=true"],
    "confit": ["method.name=confit", "method.hierarchical=true", "method.xconv_bn=true"],
}


def overrides(args: argparse.Namespace, out_dir: str) -> list[str]:
    """The run config shared by all variants."""
    return [
        f"out_dir={out_dir}", f"seed={args.seed}", "checkpoint=false",
        f"data.name={args.dataset}", "data.image_size=32", "data.normalize=imagenet",
        "scenario.protocol=task_il", f"scenario.n_tasks={args.tasks}", "scenario.order_rng=torch",
        f"scenario.order_seed={args.seed}", f"scenario.train_fraction={args.train_fraction}",
        f"scenario.test_fraction={args.test_fraction}",
        "model.backbone=cifar_resnet20", "model.pretrained=false", f"model.weights={args.weights}",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.optimizer=sgd",
        f"train.lr={args.lr}", "train.momentum=0.0", "train.weight_decay=0.0", "train.device=cpu",
        f"train.threads={args.threads}", "train.progress=false", "train.tensorboard=false",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist | digits (any 10-class dataset)")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10, help="E per task")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-fraction", type=float, default=0.02, help="per-class fraction of the train set kept")
    p.add_argument("--test-fraction", type=float, default=0.2, help="per-class fraction of the test set kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    if not Path(args.weights).is_file():
        print(f"weights not found: {args.weights} (the shared CIFAR-10 ResNet-20); pass --weights FILE")
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for name in args.variants:
            cfg = load_config(None, overrides(args, out_dir) + [f"name={name}", *VARIANTS[name]])
            start = time.perf_counter()
            record = run(cfg, log=lambda msg: print(msg, file=sys.stderr))
            m, secs = record["metrics"], time.perf_counter() - start
            rows.append((name, m["average_accuracy"], m["forgetting"], record["bytes_per_task"][0], secs))
    print(f"\nSplit {args.dataset}, {args.tasks} tasks, task-IL, CIFAR-10 ResNet-20, E={args.epochs}, "
          f"SGD lr {args.lr} (no momentum), batch {args.batch_size}, seed {args.seed}\n")  # fmt: skip
    print("| variant | final avg acc (%) | forgetting (%) | bytes / task | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, acc, fgt, nbytes, secs in rows:
        print(f"| {name} | {acc:.1f} | {fgt:.1f} | {nbytes:,} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
