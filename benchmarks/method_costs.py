"""What each method costs, side by side with plain timm on CPU: training speed and step memory, inference, storage.

Every method is built as a run builds it (``build_run``) on a synthetic stream of 3 tasks x 2 classes (32-px images)
with the project's shipped backbones (``vit_micro_patch4_32.retain_cifar10``; ConFiT:
``cifar_resnet20.retain_cifar10``); task 0 is trained through the engine (``fit_task``: LwF's and PAD's frozen
copy, EWC's Fisher, LN tuning's first rows exist), then task 1 starts. Four comparisons per method:

- **train**: one step of the method's main stage of task 1 (the stage with a budget that trains the most parameters:
  LN tuning's LN stage, ConFiT's last, ``all`` stage), as the engine runs it (``Method.loss`` on the stage's own
  first batch (images, or the features / prefix tokens the stage trains on), backward, the stage's optimiser step)
  against a plain step: the same timm backbone without surgery, ``forward_features`` -> ``forward_head`` -> a fresh
  linear head -> cross-entropy on the task's images, the same optimiser, training **the same trainable set**: the
  backbone parameters the method's stage trains, by name, plus the head. Where the method trains parameters a plain
  backbone does not have, the set is the plain parameters in their place: LN tuning -> every LayerNorm's weight and
  bias (it trains per-task rows of exactly those); Block Expansion -> the same block indices of a plain timm ViT of
  the expanded depth; LoRA -> every bias and LayerNorm of the blocks (no plain ViT has LoRA; this is a comparable
  set of small tensors in every block, so the backward also runs through the whole network). The trainable counts
  of both sides are printed. Ratio = plain time / method time (>= 1: the method is not slower); img/s = batch / time.
- **step memory**: the peak resident memory that 3 such steps add, from the first step of the stage (optimiser
  state included), measured in a separate process (``benchmarks.common.peak_rss``: glibc's mmap threshold fixed at
  64 KiB, the kernel's high-water mark reset before the steps and read after). What the method holds before the
  step (frozen copies, Fisher, caches) is not in it. Ratio = method / plain (<= 1: no more memory).
- **inference**: ``predict`` inside ``deployed()`` in eval mode (task id given in task-IL) against a plain forward
  and a linear head over the seen classes, on a new batch each call (so no cache of LN tuning's queries hits).
  Ratio = plain time / method time.
- **A/A control**: one plain step (and one plain forward) timed as two variants of the same session; its ratio would
  be 1.00 on a quiet machine, so its distance from 1 shows how far load on the machine moves the other ratios.
- **storage**: ``bytes_per_task`` of the last task (a 3-task run through the engine, without evaluation) against the
  bytes of what that task wrote first in ``deployed_state()`` (what an export keeps): the rows (along dim 0; a
  0/1-dim tensor as a whole) that changed during the task and were at their initial values before it, i.e. what the
  deployed model grew by for that task. Ratio = bytes_per_task / those bytes (1: the method's count is exact).

Timings interleave every variant in rotated rounds (``benchmarks.common``); medians over rounds.

    nice -n 10 python benchmarks/method_costs.py                         # batch 32, 10 rounds, 1 thread
    python benchmarks/method_costs.py --small                            # the suite's size (benchmarks/run.py)
    python benchmarks/method_costs.py --methods lora ln_tuning --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from benchmarks.common import (  # noqa: E402
    head_step,
    loss_step,
    machine_info,
    median_ratio,
    parse_sized,
    peak_rss,
    time_interleaved,
)
from benchmarks.peft_vit_speed import bitfit_names  # noqa: E402
from benchmarks.table import method_table  # noqa: E402
from retain.config import RunConfig, load_config  # noqa: E402
from retain.engine import RunContext, StageLoop, build_optimizer, build_run, fit_task  # noqa: E402
from retain.methods.base import Method, Stage  # noqa: E402
from retain.models import create_backbone  # noqa: E402

VIT, CNN = "vit_micro_patch4_32.retain_cifar10", "cifar_resnet20.retain_cifar10"
CPU = torch.device("cpu")
N_TASKS = 3
# method -> (protocol, overrides): the paper protocol at toy scale (task-IL for PAD's FACIL protocol and ConFiT, and
# for Block Expansion / LoRA, which keep per-task weights there), the demo's class-IL for the others
METHODS = {
    "finetune": ("class_il", []),
    "linear_probe": ("class_il", []),
    "simplecil": ("class_il", []),
    "lwf": ("class_il", []),
    "ewc": ("class_il", []),
    "ln_tuning": ("class_il", []),
    "pad": ("task_il", []),
    "confit": ("task_il", [f"model.backbone={CNN}", "train.epochs=5"]),  # E >= 5: all three hierarchical stages
    "block_expansion": ("task_il", []),
    "lora": ("task_il", []),
}
SMALL = {"batch": 16, "rounds": 9, "warmup": 2}


def config(name: str, batch: int, lr: float | None = None) -> RunConfig:
    """Method ``name`` on 3 synthetic tasks of 2 classes, ``batch`` images per class (two batches per task)."""
    protocol, extra = METHODS[name]
    over = [f"method.name={name}", "data.name=synthetic", f"data.options={{n_classes: {2 * N_TASKS}, n_per_class: "
            f"{batch}, n_test_per_class: 2}}", f"scenario.protocol={protocol}", f"scenario.n_tasks={N_TASKS}",
            f"model.backbone={VIT}", "train.epochs=1", f"train.batch_size={batch}", "train.device=cpu",
            "train.threads=1", "train.progress=false", "train.tensorboard=false", *extra]  # fmt: skip
    return load_config(None, over + ([f"train.lr={lr}"] if lr is not None else []))


def start_task_1(cfg: RunConfig) -> tuple[Method, RunContext]:
    """The method after task 0 (trained through the engine), with task 1 begun."""
    torch.manual_seed(cfg.seed)
    scenario, method = build_run(cfg, CPU)
    method.setup()
    ctx = RunContext(cfg.train, CPU, seed=cfg.seed)
    fit_task(method, scenario.tasks[0], ctx)
    task = scenario.tasks[1]
    method.model.set_seen(task.index + 1)
    method.before_task(task)
    return method, ctx


# ---- train steps ----------------------------------------------------------------------------------------------------
@dataclass
class TrainPair:
    stage: str
    inputs: str
    trainable: int
    reference: str
    ref_trainable: int
    step: Callable[[], None]
    ref_step: Callable[[], None]


def main_stage(method: Method) -> tuple[int, Stage] | None:
    """(index, stage) of task 1's stage with a budget that trains the most parameters; None if none trains."""
    task, params = method.task, dict(method.model.named_parameters())
    sized = [(sum(params[n].numel() for n in method.trained_names(task, [s])), i, s)
             for i, s in enumerate(method.stages(task)) if s.has_budget]  # fmt: skip
    sized = [x for x in sized if x[0] > 0]
    return max(sized, key=lambda x: (x[0], x[1]))[1:] if sized else None


def train_pair(name: str, batch: int) -> TrainPair | None:
    """The method's step and the plain step with the same trainable set (None for a method without gradient steps)."""
    cfg = config(name, batch, lr=1e-4)  # a small lr: the same batch is stepped on many times
    method, ctx = start_task_1(cfg)
    found = main_stage(method)
    if found is None:
        return None
    index, stage = found
    loop = StageLoop(method, method.task, stage, ctx, index)
    x, y = next(iter(loop.loader))  # the stage's own inputs: images, features or prefix tokens
    opt, model = loop.optimizer, method.model
    model.train()

    step = loss_step(method, opt, x, y, stage)
    trained = method.trained_names(method.task, [stage])
    images, labels = next(iter(torch.utils.data.DataLoader(method.task.train, batch_size=batch)))
    ref_step, n_ref, what = plain_step(cfg, method, stage, trained, images, labels - method.task.offset)
    params = dict(model.named_parameters())
    inputs = "images" if x.dim() == 4 else f"cached {'tokens' if x.dim() == 3 else 'features'} {tuple(x.shape[1:])}"
    return TrainPair(stage.name, inputs, sum(params[n].numel() for n in trained), what, n_ref, step, ref_step)


def plain_step(cfg: RunConfig, method: Method, stage: Stage, trained: list[str], x: torch.Tensor,
               y: torch.Tensor) -> tuple[Callable[[], None], int, str]:  # fmt: skip
    """A plain timm step training the same set as ``trained`` (module docstring), its count and its description."""
    kwargs = dict(cfg.model.kwargs)
    if method.name == "block_expansion":
        kwargs["depth"] = len(method.model.backbone.blocks)  # the expanded architecture, as plain timm
    torch.manual_seed(0)
    plain = create_backbone(cfg.model.backbone, pretrained=False, **kwargs)
    names, what = same_set(method, plain, trained)
    plain.requires_grad_(False)
    params = [p for n, p in plain.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    head = nn.Linear(plain.num_features, method.task.n_classes)
    opt = build_optimizer([*params, *head.parameters()], cfg.train, stage)
    plain.train()
    step = head_step(plain, head, opt, x, y)
    return step, sum(p.numel() for p in params) + sum(p.numel() for p in head.parameters()), what


def same_set(method: Method, plain: nn.Module, trained: list[str]) -> tuple[set[str], str]:
    """Names of ``plain``'s parameters in the places of the backbone parameters ``trained`` holds, and in words."""
    own = {n.removeprefix("backbone.") for n in trained if n.startswith("backbone.")}
    plain_names = {n for n, _ in plain.named_parameters()}
    backbone_names = {n for n, _ in method.model.backbone.named_parameters()}
    if not own:
        return set(), "head only"
    if backbone_names <= own:
        return plain_names, "every parameter + head"
    if own <= plain_names:
        return own, "the same parameters by name + head"
    if method.name == "ln_tuning":
        lns = [m for m in plain.modules() if isinstance(m, nn.LayerNorm)]
        ids = {id(p) for m in lns for p in m.parameters()}
        return {n for n, p in plain.named_parameters() if id(p) in ids}, "every LayerNorm weight and bias + head"
    if method.name == "block_expansion":
        prefixes = tuple(f"blocks.{i}." for i in method.new_blocks)
        return {n for n in plain_names if n.startswith(prefixes)}, "the same blocks of a plain deeper ViT + head"
    if method.name == "lora":
        return set(bitfit_names(plain)), "every bias and LayerNorm of the blocks + head"
    raise ValueError(f"{method.name}: no plain counterpart of its trainable set; add one to same_set()")


# ---- inference ------------------------------------------------------------------------------------------------------
def batches(shape: tuple[int, ...], n: int) -> Iterator[torch.Tensor]:
    """An endless cycle of ``n`` distinct random batches (seeded), the same sequence for every caller."""
    gen = torch.Generator().manual_seed(0)
    pool = [torch.rand(shape, generator=gen) for _ in range(n)]  # (B, 3, H, W) each
    while True:
        yield from pool


def predict_fn(name: str, batch: int, n_batches: int) -> tuple[Callable[[], None], str]:
    """The deployed method's ``predict`` on a new batch each call (after task 0 and task 1's start), its backbone."""
    cfg = config(name, batch)
    method, _ = start_task_1(cfg)
    method.model.eval()
    deployed = ExitStack()  # the method stays deployed while ``predict`` lives (it holds the stack)
    deployed.enter_context(method.deployed())
    task_id = method.task.index if cfg.scenario.protocol == "task_il" else None
    stream = batches((batch, 3, 32, 32), n_batches)

    @torch.no_grad()
    def predict() -> None:
        method.predict(next(stream), task_id)

    predict.deployed = deployed

    return predict, cfg.model.backbone


def plain_forward(backbone: str, batch: int, n_batches: int, n_classes: int) -> Callable[[], None]:
    torch.manual_seed(0)
    plain = create_backbone(backbone, pretrained=False).eval()
    head = nn.Linear(plain.num_features, n_classes)
    stream = batches((batch, 3, 32, 32), n_batches)

    @torch.no_grad()
    def forward() -> None:
        head(plain.forward_head(plain.forward_features(next(stream)), pre_logits=True))

    return forward


# ---- storage --------------------------------------------------------------------------------------------------------
def storage(name: str, batch: int) -> dict:
    """``bytes_per_task`` of the last task against the deployed elements that task wrote first (module docstring)."""
    cfg = config(name, batch)
    torch.manual_seed(cfg.seed)
    scenario, method = build_run(cfg, CPU)
    method.setup()
    ctx = RunContext(cfg.train, CPU, seed=cfg.seed)
    states = [snapshot(method)]
    for task in scenario.tasks:
        fit_task(method, task, ctx)
        states.append(snapshot(method))
    init, before, after = states[0], states[-2], states[-1]
    new = {k: first_written(init.get(k), before.get(k), v) for k, v in after.items()}
    n_new = sum(new.values())
    nbytes = sum(n * after[k].element_size() for k, n in new.items())
    stored = method.bytes_per_task(scenario.tasks[-1])
    return {"bytes_per_task": stored, "new_elements": n_new, "new_bytes": nbytes,
            "ratio": stored / nbytes if nbytes else None}  # fmt: skip


def first_written(init: torch.Tensor | None, before: torch.Tensor | None, after: torch.Tensor) -> int:
    """Elements of the units (rows along dim 0; a 0/1-dim tensor is one unit) that changed in the last task and
    were untouched before it. Whole rows, not single elements: a shared weight has elements (a key bias, say) whose
    gradient is zero up to rounding and that may first move in any task, while a task's own rows (heads, LN rows,
    snapshots) are untouched until their task. A tensor the deployed state gained with the last task (Block
    Expansion keeps only trained tasks' blocks) counts whole; one gained with an earlier task, not at all."""
    if before is None or init is None:
        return after.numel() if before is None else 0
    changed, untouched = after != before, before == init
    if after.dim() < 2:
        return after.numel() if bool(changed.any() and untouched.all()) else 0
    rows = changed.flatten(1).any(1) & untouched.flatten(1).all(1)  # (rows,)
    return int(rows.sum()) * after[0].numel()


def snapshot(method: Method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.deployed_state().items()}


# ---- the comparisons ------------------------------------------------------------------------------------------------
def memory_child(names: list[str], batch: int, steps: int = 3) -> dict:
    """Run in a fresh process (``--memory-child``): the step memory of each method and of its plain step."""
    torch.set_num_threads(1)
    out = {"calibration_64mib": peak_rss(lambda: torch.ones(16 * 2**20))}  # a 64 MiB tensor
    for name in names:
        pair = train_pair(name, batch)
        if pair is None:
            continue
        ref = peak_rss(lambda p=pair: [p.ref_step() for _ in range(steps)])
        ours = peak_rss(lambda p=pair: [p.step() for _ in range(steps)])
        out[name] = {"peak_bytes": ours, "ref_peak_bytes": ref}
    return out


def step_memory(names: list[str], batch: int) -> dict:
    """``memory_child`` in a fresh Python process (its malloc settings must not touch this one's timings)."""
    cmd = [sys.executable, "-m", "benchmarks.method_costs", "--memory-child", "--batch", str(batch), "--methods",
           *names]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def collect(argv: list[str] | None = None) -> dict:
    """Every comparison for the methods asked, as a results-file entry (``benchmarks/run.py``)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    pairs = {n: train_pair(n, args.batch) for n in args.methods}
    pairs = {n: p for n, p in pairs.items() if p is not None}
    fns = {(n, side): getattr(p, side) for n, p in pairs.items() for side in ("step", "ref_step")}
    control = next(iter(pairs.values())).ref_step  # A/A control: one plain step timed as two variants
    train_t = time_interleaved(fns | {("control", "a"): control, ("control", "b"): control}, args.rounds, args.warmup)
    infer_rounds = 2 * args.rounds  # inference calls are short: more rounds against the same noise
    n_batches = infer_rounds + args.warmup
    predicts = {n: predict_fn(n, args.batch, n_batches) for n in args.methods}
    plains = {bb: plain_forward(bb, args.batch, n_batches, 2 * 2) for bb in {bb for _, bb in predicts.values()}}
    infer = {(n, side): fn for n, (f, bb) in predicts.items() for side, fn in (("ours", f), ("ref", plains[bb]))}
    infer |= {("control", "a"): plains[VIT], ("control", "b"): plains[VIT]}
    infer_t = time_interleaved(infer, infer_rounds, args.warmup)  # each method next to a plain forward
    memory = step_memory(list(pairs), args.batch)
    rows = [row(n, args, pairs.get(n), train_t, infer_t, predicts[n][1], memory.get(n), storage(n, args.batch))
            for n in args.methods]  # fmt: skip
    settings = {"batch": args.batch, "rounds": args.rounds, "inference_rounds": infer_rounds, "warmup": args.warmup,
                "threads": args.threads, "tasks": N_TASKS, "classes_per_task": 2, "image_size": 32, "vit": VIT,
                "cnn": CNN}  # fmt: skip
    controls = {"train": median_ratio(train_t[("control", "a")], train_t[("control", "b")]),
                "inference": median_ratio(infer_t[("control", "a")], infer_t[("control", "b")])}  # fmt: skip
    return {"settings": settings, "memory_calibration_64mib": memory["calibration_64mib"], "aa_control": controls,
            "rows": rows}  # fmt: skip


def row(name: str, args: argparse.Namespace, pair: TrainPair | None, train_t: dict, infer_t: dict, backbone: str,
        mem: dict | None, store: dict) -> dict:  # fmt: skip
    """One method's numbers (None where a comparison does not apply)."""
    b = args.batch
    r = {"method": name, "protocol": METHODS[name][0], "backbone": backbone}
    if pair is not None:
        ours, ref = train_t[(name, "step")], train_t[(name, "ref_step")]
        r |= {"stage": pair.stage, "inputs": pair.inputs, "trainable": pair.trainable, "reference": pair.reference,
              "ref_trainable": pair.ref_trainable, "train_img_s": b / statistics.median(ours),
              "ref_train_img_s": b / statistics.median(ref), "train_ratio": median_ratio(ref, ours)}  # fmt: skip
    if mem is not None and mem["peak_bytes"] is not None and mem["ref_peak_bytes"]:
        r |= {"peak_mib": mem["peak_bytes"] / 2**20, "ref_peak_mib": mem["ref_peak_bytes"] / 2**20,
              "memory_ratio": mem["peak_bytes"] / mem["ref_peak_bytes"]}  # fmt: skip
    ours, ref = infer_t[(name, "ours")], infer_t[(name, "ref")]
    r |= {"infer_img_s": b / statistics.median(ours), "ref_infer_img_s": b / statistics.median(ref),
          "infer_ratio": median_ratio(ref, ours)}  # fmt: skip
    return r | {f"storage_{k}": v for k, v in store.items()}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return parse_sized(p, argv, SMALL)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.methods, args.batch)))
        return
    res = collect(argv)
    m, s = machine_info(), res["settings"]
    calib = (res["memory_calibration_64mib"] or 0) / 2**20
    print(f"{m['cpu']}, {m['threads']} thread(s), torch {m['torch']}, batch {s['batch']}, {s['rounds']} rounds; "
          f"memory calibration: a 64 MiB tensor measured {calib:.1f} MiB\n")  # fmt: skip
    print("\n".join(method_table(res)))


if __name__ == "__main__":
    main()
