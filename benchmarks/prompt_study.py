"""Prompt methods against LN tuning and the baselines on real data, one stream for all (issue #21): the demo's
class-IL stream (``demo/default``: the shipped ``vit_micro_patch4_32.retain_cifar10`` ViT on Split digits, 5 tasks x
2 classes, Adam, 3 epochs per task, batch 32, 2 threads, seed 0), one engine run per method.

Per method: the final average accuracy, forgetting (max_upto, the L2P / DualPrompt / LN-tuning definition) and
CODA-Prompt's consecutive-drop forgetting, the task-id accuracy after the last task (as the demo's table; the JSON
also has the mean over the steps; DualPrompt: its E-prompt selection; none for methods that select no task),
trainable parameters (max over tasks), bytes stored per task (mean, the stream rule of ``docs/metrics.md``) and two
speeds:

- **train img/s**: the stream's training images x ``train.epochs`` / the summed ``task_time_s`` of the run, i.e. how
  fast a method gets through the same budget, every stage it runs included (LN tuning's keys and head
  rectification, SimpleCIL's prototype pass, LwF's teacher);
- **inference img/s**: after the run, ``method.predict`` over every test image of the stream (all tasks seen, no
  task id), batches already in memory, under ``no_grad`` in eval mode, test-time query caching off
  (``cache_queries = False``: every prompt method and two-stage LN tuning pays its frozen query pass).

Learning rates: the demo's own (README, ``retain.demo.DEMO_OVERRIDES``): 5e-4 for finetune, LwF, SimpleCIL; 5e-3 for
LN tuning (both variants). The prompt methods have no demo setting; with the repos' optimiser (Adam, constant lr),
the default is the L2P / DualPrompt ports' rule 0.03 x batch / 256 = 3.75e-3 at the demo's batch 32 (``--prompt-lrs``
runs one row per value; every row is reported, none is selected on the test set).

    python benchmarks/prompt_study.py                    # the full study, prompt lr 3.75e-3 (~3 min on 2 cores)
    python benchmarks/prompt_study.py --prompt-lrs 0.0005 0.001 0.00375 0.01   # with the lr sweep (~7 min)
    python benchmarks/prompt_study.py --quick            # 2 tasks, 10 % of the images, 1 epoch (the test's size)
    python benchmarks/prompt_study.py --methods l2p finetune --prompt-lrs 0.001 0.00375 0.01
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from benchmarks.common import machine_info  # noqa: E402
from retain.config import RunConfig, load_config  # noqa: E402
from retain.demo import DEMO_OVERRIDES  # noqa: E402
from retain.engine import train  # noqa: E402
from retain.methods.base import Method  # noqa: E402
from retain.report.tables import format_value  # noqa: E402

PRESET = "demo/default"
PROMPT_METHODS = ("l2p", "dualprompt", "coda_prompt")
PROMPT_LR = 0.00375  # 0.03 * batch 32 / 256 (L2P-pt, DP-pt's lr scaling)
# row label -> (method name, overrides after ``method.name=``), in the table's order
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "l2p": ("l2p", ()),
    "dualprompt": ("dualprompt", ()),
    "coda_prompt": ("coda_prompt", ()),
    "ln_tuning": ("ln_tuning", tuple(DEMO_OVERRIDES["ln_tuning"])),
    "ln_tuning_single": ("ln_tuning", (*DEMO_OVERRIDES["ln_tuning"], "method.variant=single_stage")),
    "simplecil": ("simplecil", ()),
    "finetune": ("finetune", tuple(DEMO_OVERRIDES["finetune"])),
    "lwf": ("lwf", ()),
}
QUICK = ("scenario.n_tasks=2", "scenario.train_fraction=0.1", "scenario.test_fraction=0.2", "train.epochs=1")
COLUMNS = {  # key -> header
    "label": "method", "lr": "lr", "average_accuracy": "final avg acc", "forgetting": "forgetting",
    "forgetting_step_drop": "forgetting (CODA)", "task_id_accuracy_final": "task-id acc",
    "trainable_params": "trainable params", "bytes_per_task": "bytes/task", "train_img_s": "train img/s",
    "infer_img_s": "inference img/s", "seconds": "run (s)",
}  # fmt: skip
PERCENT = ("average_accuracy", "forgetting", "forgetting_step_drop", "task_id_accuracy_final")
RESULTS = Path(__file__).resolve().parent / "results" / "prompt_study.json"


def overrides(label: str, lr: float | None, args: argparse.Namespace, out_dir: str) -> list[str]:
    """``method.name=`` first (naming the method resets its section), then its settings, the size, the run's place."""
    name, extra = METHODS[label]
    over = [f"method.name={name}", *extra]
    if lr is not None:
        over.append(f"train.lr={lr}")
    over += list(QUICK) if args.quick else []
    suffix = "" if lr is None else f"-lr{lr:g}"
    return over + [f"out_dir={out_dir}", f"name={label}{suffix}", "checkpoint=false", "train.progress=false",
                   "train.tensorboard=false", f"train.threads={args.threads}"]  # fmt: skip


def inference_speed(method: Method, repeats: int) -> float:
    """Images per second of ``method.predict`` over every test image of the stream (batches preloaded), query cache
    off; the best of ``repeats`` passes after one untimed pass."""
    if hasattr(method.cfg, "cache_queries"):
        method.cfg.cache_queries = False
    ctx = method.ctx
    batches = [x.to(ctx.device) for task in method.scenario.tasks for x, _ in ctx.eval_loader(task.test)]
    n = sum(len(x) for x in batches)
    best = float("inf")
    with torch.no_grad(), method.deployed():
        method.model.eval()
        for i in range(repeats + 1):  # pass 0: untimed warm-up
            start = time.perf_counter()
            for x in batches:
                with ctx.autocast:
                    method.predict(x, None)
            best = min(best, time.perf_counter() - start) if i else best
    return n / best


def study_row(label: str, cfg: RunConfig, args: argparse.Namespace) -> dict:
    """One engine run of ``cfg`` and its row."""
    start = time.perf_counter()
    record, method = train(cfg, log=lambda *a, **k: None)
    seconds = time.perf_counter() - start
    m = record["metrics"]
    n_train = sum(len(t.train) for t in method.scenario.tasks)
    tid = record["task_id_accuracy"]
    return {
        "label": label, "method": cfg.method.name, "variant": getattr(cfg.method, "variant", None), "lr": cfg.train.lr,
        "average_accuracy": m["average_accuracy"], "average_incremental_accuracy": m["average_incremental_accuracy"],
        "forgetting": m["forgetting"], "forgetting_step_drop": m["forgetting_step_drop"],
        "task_id_accuracy": m.get("task_id_accuracy"), "task_id_accuracy_final": tid[-1] if tid else None,
        "trainable_params": max(record["trainable_params"]),
        "bytes_per_task": sum(record["bytes_per_task"]) / len(record["bytes_per_task"]),
        "train_images": n_train * cfg.train.epochs, "train_s": sum(record["task_time_s"]),
        "train_img_s": n_train * cfg.train.epochs / sum(record["task_time_s"]),
        "infer_img_s": inference_speed(method, args.infer_repeats), "seconds": seconds,
        "accuracy_matrix": record["accuracy_matrix"],
    }  # fmt: skip


def cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "label":
        return value
    if key == "lr":
        return f"{value:g}"
    if key in ("train_img_s", "infer_img_s"):
        return f"{value:,.0f}"
    if key in PERCENT or key == "seconds":
        return f"{value:.1f}"
    return format_value(key, value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|:---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"the test's size: {' '.join(QUICK)}")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--prompt-lrs", nargs="+", type=float, default=[PROMPT_LR],
                        help="Adam lr of the prompt methods; one row per value")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--infer-repeats", type=int, default=None, help="inference passes, best kept (3; quick: 1)")
    parser.add_argument("--runs-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.infer_repeats = args.infer_repeats or (1 if args.quick else 3)
    rows, settings = [], None
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.runs_dir or tmp
        for label in args.methods:
            for lr in args.prompt_lrs if label in PROMPT_METHODS else [None]:
                cfg = load_config(PRESET, overrides(label, lr, args, out_dir))
                settings = settings or cfg
                print(f"[prompt_study] {label} (lr {cfg.train.lr:g}) ...", flush=True)
                rows.append(study_row(label, cfg, args))
    print(table(rows))
    res = {
        "benchmark": "prompt_study", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "quick": args.quick,
        "settings": {"preset": PRESET, "backbone": settings.model.backbone, "dataset": settings.data.name,
                     "protocol": settings.scenario.protocol, "n_tasks": settings.scenario.n_tasks,
                     "train_fraction": settings.scenario.train_fraction, "epochs": settings.train.epochs,
                     "batch_size": settings.train.batch_size, "optimizer": settings.train.optimizer,
                     "threads": args.threads, "seed": settings.seed, "prompt_lrs": args.prompt_lrs,
                     "infer_repeats": args.infer_repeats, "query_cache_at_inference": False},
        "command": "python benchmarks/prompt_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
