"""CPU-scale comparison of PAD (Pelosin, Jha et al., CVPRW 2022) with its baselines on a real stream.

The shipped CIFAR-10 ViT (``vit_micro_patch4_32.retain_cifar10``) is continually fine-tuned on Split Fashion-MNIST
(5 tasks x 2 classes, task-incremental with one head per task and old heads frozen, so both the task-aware (TAw)
and the task-agnostic (TAg) views are reported), with FACIL's finetune (current head only), EWC, LwF and the four
PAD variants (LwF + symmetric/asymmetric POD of the attention logits or of the per-head context, spatial pooling,
mu = 1). It prints a markdown table (means over seeds): the accuracy on each task right after learning it (TAw,
plasticity), and the final average accuracy and forgetting for both views.

    PYTHONPATH=. nice -n 10 python benchmarks/pad_cpu.py                       # the README/docs table
    PYTHONPATH=. python benchmarks/pad_cpu.py --dataset digits --train-fraction 1 --test-fraction 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from retain.config import load_config
from retain.engine import run

VARIANTS = {
    "finetune (FACIL)": ["method.name=finetune", "method.train_mask=current"],
    "ewc": ["method.name=ewc"],
    "lwf": ["method.name=lwf"],
    "lwf + sym attentional": ["method.name=pad", "method.variant=attentional", "method.asymmetric=false"],
    "lwf + asym attentional": ["method.name=pad", "method.variant=attentional", "method.asymmetric=true"],
    "lwf + sym functional": ["method.name=pad", "method.variant=functional", "method.asymmetric=false"],
    "lwf + asym functional": ["method.name=pad", "method.variant=functional", "method.asymmetric=true"],
}


def overrides(args: argparse.Namespace, out_dir: str, seed: int) -> list[str]:
    """The run config shared by all variants: the demo's optimiser settings on a task-IL stream."""
    return [
        f"out_dir={out_dir}", f"seed={seed}", "checkpoint=false", f"data.name={args.dataset}",
        "scenario.protocol=task_il", f"scenario.n_tasks={args.tasks}", f"scenario.order_seed={seed}",
        f"scenario.train_fraction={args.train_fraction}", f"scenario.test_fraction={args.test_fraction}",
        "model.backbone=vit_micro_patch4_32.retain_cifar10", f"train.epochs={args.epochs}", "train.batch_size=32",
        "train.optimizer=adam", f"train.lr={args.lr}", "train.device=cpu", f"train.threads={args.threads}",
        "train.progress=false", "train.tensorboard=false",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist | digits")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--train-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for name in args.variants:
            per_seed = []
            for seed in args.seeds:
                cfg = load_config("demo/default", overrides(args, out_dir, seed) + [f"name={name}-{seed}".replace(
                    " ", "_").replace("(", "").replace(")", ""), *VARIANTS[name]])  # fmt: skip
                start = time.perf_counter()
                rec = run(cfg, log=lambda msg: print(msg, file=sys.stderr))
                taw, tag = rec["metrics_by_view"]["taw"], rec["metrics_by_view"]["tag"]
                A = rec["matrices"]["taw"]
                new_task = statistics.mean(A[t][t] for t in range(len(A)))  # plasticity: each task right after it
                per_seed.append((new_task, taw["average_accuracy"], taw["forgetting"], tag["average_accuracy"],
                                 tag["forgetting"], time.perf_counter() - start))  # fmt: skip
            rows.append((name, [statistics.mean(v) for v in zip(*per_seed, strict=True)]))
    print(f"\nSplit {args.dataset}, {args.tasks} tasks, task-IL, shipped CIFAR-10 ViT, {args.epochs} epochs, Adam "
          f"{args.lr}, batch 32, train fraction {args.train_fraction}, seeds {args.seeds} (means)\n")  # fmt: skip
    print("| method | new-task acc (TAw) | TAw acc | TAw forgetting | TAg acc | TAg forgetting | time / run (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (new, acc, fgt, tag_acc, tag_fgt, secs) in rows:
        print(f"| {name} | {new:.1f} | {acc:.1f} | {fgt:.1f} | {tag_acc:.1f} | {tag_fgt:.1f} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
