"""PAD (Pelosin, Jha et al., CVPRW 2022): cost of a PAD train step against LwF alone, same model, batch and weights.

Both steps run the current model and the frozen previous-task model on the batch (LwF's KD needs both); PAD adds the
recording hooks, the recomputed attention logits (attentional variant) and the pooled distillation. Each round times
every variant once in a rotating order; the script prints the median time of each and the median per-round ratio
PAD / LwF (goal of issue #8: <= 1.2).

    nice -n 10 python benchmarks/pad_overhead.py                     # vit_tiny_patch4_32, batch 64, 1 thread
    python benchmarks/pad_overhead.py --backbone early_conv_vit --batch 32 --kwargs "depth=4"
    python benchmarks/pad_overhead.py --small                       # the suite's size (benchmarks/run.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from benchmarks.common import loss_step, median_ratio, parse_sized, time_interleaved  # noqa: E402
from retain.config import load_config  # noqa: E402
from retain.engine import RunContext, build_run, fit_task  # noqa: E402

SMALL = {"backbone": "vit_micro_patch4_32", "batch": 16, "rounds": 9, "warmup": 2}
VARIANTS = {
    "lwf": ["method.name=lwf"],
    "pad asym functional": ["method.name=pad", "method.variant=functional", "method.asymmetric=true"],
    "pad sym functional": ["method.name=pad", "method.variant=functional", "method.asymmetric=false"],
    "pad asym attentional": ["method.name=pad", "method.variant=attentional", "method.asymmetric=true"],
    "pad sym attentional": ["method.name=pad", "method.variant=attentional", "method.asymmetric=false"],
}


def _step(args: argparse.Namespace, extra: list[str]) -> Callable[[], None]:
    """One optimiser step of the method on task 1 (after a 1-step task 0, so the frozen copy exists)."""
    over = ["data.name=synthetic", f"data.options={{n_classes: 4, n_per_class: {args.batch}, n_test_per_class: 1, "
            f"image_size: {args.image_size}}}", f"data.image_size={args.image_size}", "scenario.n_tasks=2",
            f"model.backbone={args.backbone}", "model.pretrained=false", f"model.kwargs={{{args.kwargs}}}",
            "train.steps=1", "train.progress=false", "train.tensorboard=false", "train.device=cpu",
            *extra]  # fmt: skip
    cfg = load_config(None, over)
    torch.manual_seed(0)
    scenario, method = build_run(cfg, torch.device("cpu"))
    method.setup()
    fit_task(method, scenario.tasks[0], RunContext(cfg.train, torch.device("cpu")))
    task = scenario.tasks[1]
    method.model.set_seen(2)
    method.before_task(task)
    stage = method.stages(task)[0]
    params = [p for p in method.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=1e-4)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(task.offset, task.offset + task.n_classes, (args.batch,))
    method.model.train()
    return loss_step(method, opt, x, y, stage)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="vit_tiny_patch4_32")
    p.add_argument("--kwargs", default="", help="timm kwargs, e.g. 'depth: 4'")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    return parse_sized(p, argv, SMALL)


def collect(argv: list[str] | None = None) -> dict:
    """Median step time of each variant and the median per-round ratio variant / LwF (results-file entry)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    steps = {name: _step(args, extra) for name, extra in VARIANTS.items()}
    times = time_interleaved(steps, args.rounds, args.warmup)
    lwf = times["lwf"]
    rows = [{"variant": n, "step_s": statistics.median(times[n]), "ratio": median_ratio(times[n], lwf)} for n in steps]
    settings = {k: getattr(args, k) for k in ("backbone", "kwargs", "image_size", "batch", "rounds", "warmup",
                                              "threads")}  # fmt: skip
    ratio = "variant step time / LwF step time (<= 1.2: goal of issue #8)"
    return {"settings": settings, "ratio": ratio, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    res = collect(argv)
    s = res["settings"]
    print(f"{s['backbone']} {s['kwargs']}, batch {s['batch']}, {s['threads']} thread(s), {s['rounds']} rounds, "
          f"torch {torch.__version__}")  # fmt: skip
    for r in res["rows"]:
        print(f"{r['variant']:24s} {1e3 * r['step_s']:8.1f} ms   PAD / LwF {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
