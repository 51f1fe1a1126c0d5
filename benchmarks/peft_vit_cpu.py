"""PEFT-ViT (Bafghi et al., CVPRW 2024) at CPU scale on real data: single-task fine-tuning with retention.

The project's CIFAR-10 ViT (``vit_micro_patch4_32.retain_cifar10``, 4 blocks, dim 128) is fine-tuned once on a new
domain (default Fashion-MNIST, 10 classes, upsampled to 32x32 RGB; ``scenario.protocol=finetune``) with the paper's
recipe scaled down: SGD momentum 0.9, cosine schedule with 5 % warm-up steps (1 % for the linear probe), a budget in
steps, seed 0, one thread. For each variant it reports (a) accuracy on the new domain's test set and (b) retention of
the pre-training domain: DINO's weighted k-NN (k = 20, T = 0.07) on the CIFAR-10 JPEG test set with the CIFAR-10
train set as memory, on the CLS token after the final norm as deployed (merged LoRA, the expanded model), before and
after fine-tuning; plus parameters trained and training images per second.

The "before" k-NN is measured once: every variant starts from exactly the pre-trained function (LoRA B = 0, the
inserted blocks output zero; tests/test_lora.py and tests/test_block_expansion.py), and this is checked here on
``--check-images`` retention images per variant.

    PYTHONPATH=. nice -n 10 python benchmarks/peft_vit_cpu.py            # docs/peft_vit.md (about an hour, 1 core)
    python benchmarks/peft_vit_cpu.py --steps 50 --retention-fraction 0.05 --variants full block_p1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retain.config import load_config
from retain.engine import RunContext, build_run, evaluate, fit_task, seed_everything
from retain.engine.build import retention_datasets
from retain.engine.evaluation import retention_accuracy

CIFAR10 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CPU = torch.device("cpu")
# variant -> (method overrides, lr): the paper's SGD learning rates (full 0.005, linear 0.005, LoRA 0.05 as for
# r = 4 and 16, Block Expansion 0.05); p = 1 puts one block on top of the 4, p = 2 one after every 2 blocks
VARIANTS = {
    "full": (["method.name=finetune"], 0.005),
    "linear": (["method.name=linear_probe"], 0.005),
    "lora_r4": (["method.name=lora", "method.r=4"], 0.05),
    "lora_r8": (["method.name=lora", "method.r=8"], 0.05),
    "block_p1": (["method.name=block_expansion", "method.split=4"], 0.05),
    "block_p2": (["method.name=block_expansion", "method.split=2"], 0.05),
    "block_p1_uncached": (["method.name=block_expansion", "method.split=4", "method.cache_prefix=false"], 0.05),
    "block_p2_uncached": (["method.name=block_expansion", "method.split=2", "method.cache_prefix=false"], 0.05),
}
DEFAULT = ["full", "linear", "lora_r4", "lora_r8", "block_p1", "block_p2"]


def overrides(args: argparse.Namespace, name: str) -> list[str]:
    method, lr = VARIANTS[name]
    lr = dict(item.split("=") for item in args.lr).get(name, lr)
    warmup = args.steps // (100 if name == "linear" else 20)
    return [
        f"name={name}", f"seed={args.seed}", "checkpoint=false", f"data.name={args.dataset}", "data.image_size=32",
        "data.normalize=backbone", "data.augment=none", "data.retention.name=cifar10",
        f"data.retention.root={args.retention_root}", "scenario.protocol=finetune",
        f"scenario.train_fraction={args.train_fraction}", f"scenario.test_fraction={args.test_fraction}",
        "model.backbone=vit_micro_patch4_32.retain_cifar10", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=0",
        f"train.lr={lr}", "train.schedule=cosine", f"train.warmup_steps={warmup}", "train.device=cpu",
        f"train.threads={args.threads}", "train.progress=false", "train.tensorboard=false", *method,
    ]  # fmt: skip


def _stratified(data, fraction: float, seed: int):
    """A seeded per-class ``fraction`` of ``data`` (all of it at 1.0)."""
    if fraction >= 1.0:
        return data
    targets, rng = np.asarray(data.targets), np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(targets == c), max(1, round((targets == c).sum() * fraction)), replace=False)
            for c in np.unique(targets)]  # fmt: skip
    return Subset(data, np.sort(np.concatenate(keep)).tolist())


def run_variant(args: argparse.Namespace, name: str, shared: dict) -> dict:
    """Fine-tune one variant; returns its row (accuracies in %, seconds)."""
    cfg = load_config(None, overrides(args, name))
    torch.set_num_threads(args.threads)
    seed_everything(cfg.seed)
    scenario, method = build_run(cfg, CPU)
    method.setup()
    ctx = RunContext(cfg.train, CPU, seed=cfg.seed)
    method.bind(ctx)
    r = cfg.data.retention
    if "retention" not in shared:
        train, test = retention_datasets(cfg, scenario.tasks[0].test.base)
        shared["retention"] = (_stratified(train, args.retention_fraction, 0), test)
        with method.deployed():
            shared["before"] = retention_accuracy(method, shared["retention"], r.k, r.temperature)
            shared["check_x"] = torch.stack([test[i][0] for i in range(args.check_images)])  # (n, 3, 32, 32)
            shared["check_f"] = method.features(shared["check_x"])
    with method.deployed():
        same_start = torch.allclose(method.features(shared["check_x"]), shared["check_f"], atol=1e-5)
    seconds, n_trained = fit_task(method, scenario.tasks[0], ctx)
    ev = evaluate(method, scenario, 0, ctx, shared["retention"], r.k, r.temperature)
    images = args.steps * args.batch_size
    return {"variant": name, "method": cfg.method.name, "lr": cfg.train.lr, "new_task_acc": ev.primary[0],
            "knn_before": shared["before"], "knn_after": ev.retention, "trainable_params": n_trained,
            "train_img_per_s": images / seconds, "train_s": seconds, "eval_s": ev.seconds, "same_start": same_start,
            "prefix_cached": getattr(method, "prefix_cached", None)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", help="the new domain: fashion_mnist | digits")
    p.add_argument("--train-fraction", type=float, default=0.1, help="per-class fraction of its train set")
    p.add_argument("--test-fraction", type=float, default=1.0, help="per-class fraction of its test set")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--retention-root", default=str(CIFAR10), help="CIFAR-10 (JPEG tar.gz or folders)")
    p.add_argument("--retention-fraction", type=float, default=1.0, help="per-class fraction of the k-NN memory")
    p.add_argument("--check-images", type=int, default=256, help="retention images checked for the same start")
    p.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    p.add_argument("--lr", nargs="*", default=[], metavar="VARIANT=LR", help="another lr, e.g. linear=0.05")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if not Path(args.retention_root).exists():
        print(f"CIFAR-10 not found at {args.retention_root}; pass --retention-root PATH")
        return 2
    rows, shared = [], {}
    for name in args.variants:
        start = time.perf_counter()
        rows.append(run_variant(args, name, shared))
        print(f"[{name}] {json.dumps(rows[-1])} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    print(f"\n{args.dataset} (train fraction {args.train_fraction}, test fraction {args.test_fraction}), "
          f"{args.steps} steps x batch {args.batch_size}, SGD momentum 0.9, cosine, seed {args.seed}, "
          f"{args.threads} thread(s); retention: CIFAR-10 k-NN (k=20, T=0.07), memory fraction "
          f"{args.retention_fraction}\n")  # fmt: skip
    print("| variant | lr | new-task acc | k-NN before | k-NN after | trainable params | train img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['lr']} | {r['new_task_acc']:.2f} | {r['knn_before']:.2f} | "
              f"{r['knn_after']:.2f} | {r['trainable_params']:,} | {r['train_img_per_s']:.0f} |")  # fmt: skip
    if not all(r["same_start"] for r in rows):
        print("WARNING: a variant did not start from the pre-trained function:",
              [r["variant"] for r in rows if not r["same_start"]])  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
