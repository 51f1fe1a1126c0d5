"""Prompt methods (L2P, DualPrompt, CODA-Prompt) against LN tuning: train step and inference on one ViT, one batch.

The measured answer to LN tuning's claim (De Min et al.) of being "computationally cheaper" than prompt methods, and
the share of a prompt method's inference that is its frozen query pass (PROMPTS.md §0.1, §5.2: every prompt method
costs 2 ViT forward passes per image at training and at inference).

Every method is built as a run builds it (``build_run``) on a synthetic class-IL stream of 2 tasks x 2 classes with
the same backbone (random weights: timings do not depend on them), ``train.batch_size`` = the batch; task 0 is set up
as the engine sets it up (``bind``, ``set_seen``, ``before_task``: LN tuning fits task 0's key in closed form), and
its main stage (the stage with a budget that trains the most parameters: LN tuning's LN stage, the prompt methods'
one stage) gives the trainable set and the optimiser (``StageLoop``). Test-time query caching is off
(``method.cache_queries=false``), so every ``predict`` pays its query pass. Per method:

- **train**: one step (``Method.loss`` on the stage's first batch, backward, the stage's optimiser step), in train
  mode; ratio = method time / LN tuning's LN-stage step time (> 1: the method is dearer);
- **inference**: ``predict(x)`` on a fixed batch under no_grad in eval mode (class-IL: no task id); ratio = method
  time / LN tuning's (two-stage) ``predict`` time;
- **query share**: the time of ``method.query(x, cache=False)`` (the frozen CLS pass) / the method's inference time
  (none where ``predict`` runs no query pass: single-stage LN tuning);
- **forward passes per image**: images through ``backbone.patch_embed`` per image of the batch, counted with a hook
  over a second train step and a second ``predict`` (a query cache would hit there; outside the timings).

Every function of every method is timed once per round, in an order rotated by one each round, after untimed
warm-up passes (``benchmarks.common.time_interleaved``); each ratio is the median over rounds of the per-round ratio,
so both sides always ran side by side under the same machine load.

    nice -n 10 python benchmarks/prompt_cost.py            # vit_tiny_patch4_32 (192-d, 6 blocks), batch 32, 10 rounds
    python benchmarks/prompt_cost.py --quick               # 2 rounds, a 5-block 32-d ViT, batch 8 (the test's size)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from benchmarks.common import loss_step, machine_info, median_ratio, time_interleaved  # noqa: E402
from benchmarks.method_costs import main_stage  # noqa: E402
from retain.config import RunConfig, load_config  # noqa: E402
from retain.engine import RunContext, StageLoop, build_run  # noqa: E402
from retain.methods.base import Method  # noqa: E402

CPU = torch.device("cpu")
REF = "ln_tuning"
PROMPT_METHODS = ("l2p", "dualprompt", "coda_prompt")
# row name -> config overrides of the method
VARIANTS = {
    REF: ["method.name=ln_tuning"],
    "ln_tuning (single stage)": ["method.name=ln_tuning", "method.variant=single_stage"],
    **{m: [f"method.name={m}"] for m in PROMPT_METHODS},
}
FULL = {"backbone": "vit_tiny_patch4_32", "kwargs": "{}", "batch": 32, "rounds": 10, "warmup": 2}
QUICK = {"backbone": "vit_tiny_patch4_32", "kwargs": "{embed_dim: 32, depth: 5, num_heads: 2}", "batch": 8,
         "rounds": 2, "warmup": 1}  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results" / "prompt_cost.json"


def config(variant: str, args: argparse.Namespace) -> RunConfig:
    """``variant`` on 2 synthetic class-IL tasks of 2 classes, ``batch`` images per class, query caching off."""
    over = [*VARIANTS[variant], "data.name=synthetic",
            f"data.options={{n_classes: 4, n_per_class: {args.batch}, n_test_per_class: 2}}",
            "scenario.protocol=class_il", "scenario.n_tasks=2", f"model.backbone={args.backbone}",
            "model.pretrained=false", f"model.kwargs={args.kwargs}", "train.epochs=1",
            f"train.batch_size={args.batch}", "train.lr=1e-4", "train.device=cpu", f"train.threads={args.threads}",
            "train.progress=false", "train.tensorboard=false", "method.cache_queries=false"]  # fmt: skip
    cfg = load_config(None, over)  # (method.name first: naming the method resets its section to the defaults)
    if cfg.method.cache_queries:
        raise RuntimeError(f"{variant}: test-time query caching must be off")
    return cfg


@dataclass
class Bench:
    """One method after task 0's set-up: its callables (train step, predict, query pass) and what they cover."""

    method: Method
    stage: str
    trainable: int
    step: Callable[[], None]
    predict: Callable[[], None]
    query: Callable[[], None]
    x_train: torch.Tensor
    x_test: torch.Tensor


def build(variant: str, args: argparse.Namespace) -> Bench:
    """The method with task 0 begun as the engine begins it, and its main stage's step on a fixed batch."""
    cfg = config(variant, args)
    torch.manual_seed(cfg.seed)
    scenario, method = build_run(cfg, CPU)
    method.setup()
    ctx = RunContext(cfg.train, CPU, seed=cfg.seed)
    method.bind(ctx)
    task = scenario.tasks[0]
    method.model.set_seen(task.index + 1)
    method.before_task(task)
    index, stage = main_stage(method)
    loop = StageLoop(method, task, stage, ctx, index)  # marks the stage's set trainable, builds its optimiser
    x, y = next(iter(loop.loader))  # (B, 3, H, W), (B,)
    train_step = loss_step(method, loop.optimizer, x, y, stage)
    model = method.model
    x_test = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step() -> None:
        model.train()
        train_step()

    @torch.no_grad()
    def predict() -> None:
        model.eval()
        with method.deployed():
            method.predict(x_test)

    @torch.no_grad()
    def query() -> None:
        model.eval()
        method.query(x_test, cache=False)

    return Bench(method, stage.name, trainable, step, predict, query, x, x_test)


def forward_passes(bench: Bench, fn: Callable[[], None], batch: int) -> float:
    """Images through the backbone's ``patch_embed`` during a second call of ``fn`` (a cache would be warm), per
    image of the batch."""
    fn()
    seen = [0]

    def count(module: torch.nn.Module, inputs: tuple) -> None:
        seen[0] += inputs[0].shape[0]

    handle = bench.method.model.backbone.patch_embed.register_forward_pre_hook(count)
    try:
        fn()
    finally:
        handle.remove()
    return seen[0] / batch


def collect(argv: list[str] | None = None) -> dict:
    """Every method's numbers, timed side by side in one session."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    benches = {v: build(v, args) for v in VARIANTS}
    passes = {v: (forward_passes(b, b.step, args.batch), forward_passes(b, b.predict, args.batch))
              for v, b in benches.items()}  # fmt: skip
    fns = {(v, kind): getattr(b, kind) for v, b in benches.items() for kind in ("step", "predict", "query")}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t = time_interleaved(fns, args.rounds, args.warmup)
    rows = []
    for v, b in benches.items():
        step, pred, query = t[(v, "step")], t[(v, "predict")], t[(v, "query")]
        rows.append({"method": v, "stage": b.stage, "trainable": b.trainable, "train_forward_per_image": passes[v][0],
                     "infer_forward_per_image": passes[v][1], "train_ms": 1e3 * statistics.median(step),
                     "train_ratio": median_ratio(step, t[(REF, "step")]), "infer_ms": 1e3 * statistics.median(pred),
                     "infer_ratio": median_ratio(pred, t[(REF, "predict")]),
                     "query_ms": 1e3 * statistics.median(query),
                     "query_share": median_ratio(query, pred) if passes[v][1] >= 2 else None})  # fmt: skip
    settings = {k: getattr(args, k) for k in ("backbone", "kwargs", "batch", "rounds", "warmup", "threads")}
    image = list(benches[REF].x_train.shape[1:])
    machine = machine_info() | {"load_before": load_before,
                                "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}  # fmt: skip
    return {"settings": settings | {"image": image, "protocol": "class_il", "query_cache": False},
            "ratio": f"method time / {REF} time, median of per-round ratios (> 1: the method is dearer)",
            "machine": machine, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rows": rows}  # fmt: skip


def table(res: dict) -> list[str]:
    """The results as a Markdown table."""
    lines = ["| method | stage | trainable | fwd/img train | fwd/img infer | train ms | train × LN | infer ms "
             "| infer × LN | query ms | query share |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in res["rows"]:
        share = "— (no query pass)" if r["query_share"] is None else f"{100 * r['query_share']:.0f} %"
        lines.append(f"| {r['method']} | {r['stage']} | {r['trainable']:,} | {r['train_forward_per_image']:g} | "
                     f"{r['infer_forward_per_image']:g} | {r['train_ms']:.1f} | {r['train_ratio']:.2f} | "
                     f"{r['infer_ms']:.1f} | {r['infer_ratio']:.2f} | {r['query_ms']:.1f} | {share} |")  # fmt: skip
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"a tiny run (the test's size): {QUICK}")
    p.add_argument("--backbone", help=f"default {FULL['backbone']}")
    p.add_argument("--kwargs", help="model.kwargs, a YAML mapping (default {})")
    p.add_argument("--batch", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS, help="the results JSON")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():  # flags given explicitly win
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    res = collect(argv)
    args, s, m = parse(argv), res["settings"], res["machine"]
    res["command"] = " ".join(["python benchmarks/prompt_cost.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{s['backbone']} {s['kwargs']}, {s['image']} images, batch {s['batch']}, {s['rounds']} rounds, "
          f"{s['threads']} thread(s); {m['cpu']}, torch {m['torch']}, load {m['load_before']} -> "
          f"{m['load_after']}")  # fmt: skip
    print("\n".join(table(res)))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
