"""LN tuning (De Min et al., ICCVW 2023): cost of the per-task LayerNorm model against plain timm ViTs, on CPU.

Ratios are (reference time) / (our time), so >= 1 means ours is at least as fast. Each round times every variant once,
side by side in a rotating order; the ratio of a round compares neighbours, and the script prints the median over
rounds (and the median times). Goals from issue #4: train step >= 0.95, inference >= 0.95, mixed batch >= 0.9.

    nice -n 10 python benchmarks/ln_tuning_speed.py                      # vit_tiny_patch4_32, batch 64, 1 thread
    python benchmarks/ln_tuning_speed.py --backbone vit_micro_patch4_32 --rounds 30 --threads 2
    python benchmarks/ln_tuning_speed.py --small                          # the suite's size (benchmarks/run.py)
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from benchmarks.common import head_step, measure, parse_sized
from retain.methods.ln_tuning import select_task
from retain.models import create_backbone
from retain.models.adapters import use_task
from retain.models.task_layernorm import PRETRAINED, inject_task_layernorm

SMALL = {"backbone": "vit_micro_patch4_32", "batch": 16, "tasks": 5, "rounds": 9, "warmup": 2}


def _plain_ln_only(model: nn.Module) -> list[nn.Parameter]:
    model.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def build_cases(backbone: str, batch: int, n_tasks: int) -> dict[str, dict[str, Callable[[], None]]]:
    """Three comparisons, each {reference name: fn, ours name: fn}."""
    torch.manual_seed(0)
    plain = create_backbone(backbone, pretrained=False)
    ours = copy.deepcopy(plain)
    inject_task_layernorm(ours, n_tasks)
    size = plain.patch_embed.img_size
    x = torch.rand(batch, 3, *size)  # (B, 3, H, W)
    y = torch.randint(0, 10, (batch,))
    dim = plain.num_features
    head_a, head_b = nn.Linear(dim, 10), nn.Linear(dim, 10)
    head_b.load_state_dict(head_a.state_dict())
    opt_a = torch.optim.Adam([*_plain_ln_only(plain), *head_a.parameters()], lr=1e-3)
    ours.requires_grad_(False)
    ln_rows = [p for n, p in ours.named_parameters() if n.rsplit(".", 1)[-1] in ("ln_weight", "ln_bias")]
    for p in ln_rows:
        p.requires_grad_(True)
    opt_b = torch.optim.Adam([*ln_rows, *head_b.parameters()], lr=1e-3)
    plain_step = head_step(plain, head_a, opt_a, x, y)

    def ours_step() -> None:
        with use_task(ours, 3):
            head_step(ours, head_b, opt_b, x, y)()

    keys = torch.randn(n_tasks, dim)  # (T, D)
    mixed = torch.arange(batch) % n_tasks  # (B,) every task present

    @torch.no_grad()
    def plain_two_passes() -> None:
        plain.forward_features(x)  # the frozen model's pass (query)
        head_a(plain.forward_head(plain.forward_features(x), pre_logits=True))  # the tuned model's pass

    @torch.no_grad()
    def ours_select_and_predict() -> None:
        with use_task(ours, PRETRAINED):
            q = ours.forward_features(x)[:, 0]  # (B, D)
        with use_task(ours, select_task(q, keys)):
            head_b(ours.forward_head(ours.forward_features(x), pre_logits=True))

    @torch.no_grad()
    def ours_single_task() -> None:
        with use_task(ours, 3):
            ours.forward_features(x)

    @torch.no_grad()
    def ours_mixed() -> None:
        with use_task(ours, mixed):
            ours.forward_features(x)

    @torch.no_grad()
    def ours_split_by_task() -> None:
        for t in range(n_tasks):
            with use_task(ours, t):
                ours.forward_features(x[mixed == t])

    @torch.no_grad()
    def plain_query() -> None:
        plain.forward_features(x)[:, 0]  # a frozen copy of the pre-trained ViT

    @torch.no_grad()
    def shared_query() -> None:
        with use_task(ours, PRETRAINED):
            ours.forward_features(x)[:, 0]  # the tuned model with its frozen pre-trained LN row

    plain.eval()  # no dropout or BN in these ViTs: train and eval mode compute the same
    ours.eval()
    return {
        "train step (LN rows vs plain LN-only)": {"plain ViT, LNs trainable": plain_step, "per-task LN": ours_step},
        "inference (select + predict vs two plain passes)": {"two plain passes": plain_two_passes,
                                                             "query + selected rows": ours_select_and_predict},
        "mixed-task batch (one pass vs single-task pass)": {"single task": ours_single_task, "mixed": ours_mixed},
        "query (pre-trained LN row vs frozen copy)": {"frozen copy": plain_query, "pre-trained row": shared_query},
        f"mixed-task batch (one pass vs split into {n_tasks} passes)": {"split": ours_split_by_task,
                                                                        "mixed": ours_mixed},
    }  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vit_tiny_patch4_32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parse_sized(parser, argv, SMALL)


def collect(argv: list[str] | None = None) -> dict:
    """The comparisons as a results-file entry (``benchmarks/run.py``)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    rows = measure(build_cases(args.backbone, args.batch, args.tasks), args.rounds, args.warmup)
    settings = {k: getattr(args, k) for k in ("backbone", "batch", "tasks", "rounds", "warmup", "threads")}
    return {"settings": settings, "ratio": "reference time / ours (>= 1: ours not slower)",
            "rows": [r._asdict() for r in rows]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    res = collect(argv)
    s = res["settings"]
    print(f"{s['backbone']}, batch {s['batch']}, {s['tasks']} tasks, {s['threads']} thread(s), {s['rounds']} rounds, "
          f"torch {torch.__version__}")  # fmt: skip
    for r in res["rows"]:
        print(f"{r['case']:58s} {r['ref']} {1e3 * r['ref_s']:8.1f} ms | {r['ours']} {1e3 * r['ours_s']:8.1f} ms | "
              f"ratio {r['ratio']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
